"""Fixtures for the hot-path tests: every test runs on each available implementation."""

import pytest

from vsva import hotpath
from vsva.hotpath.layout import SL_R, SL_W
from vsva.hotpath.testing import GuestProcess, GuestVM, HostMemory, install_pasid, make_pasid_dir

IMPLS = [("python", hotpath.PureIommu)]
if hotpath.compiled_available():
    from vsva.hotpath._translate import Iommu as _Compiled

    IMPLS.insert(0, ("compiled", _Compiled))


@pytest.fixture(params=[cls for _, cls in IMPLS], ids=[name for name, _ in IMPLS])
def Impl(request):
    return request.param


class World:
    """One host, VM 1 with two processes (PASIDs 5, 6), VM 2 with one (PASID 9); device 0
    (no ATS) and device 1 (ATS) share one PASID directory."""

    VA = 0x7F00_0000_0000

    def __init__(self, Impl, nframes=2048, seed=7, **kw):
        self.host = host = HostMemory(nframes, seed=seed)
        self.vm1 = GuestVM(host, 1)
        self.vm2 = GuestVM(host, 2)
        self.p5 = GuestProcess(self.vm1)
        self.p6 = GuestProcess(self.vm1)
        self.p9 = GuestProcess(self.vm2)
        self.dir = make_pasid_dir(host)
        for pasid, proc in ((5, self.p5), (6, self.p6), (9, self.p9)):
            install_pasid(host, self.dir, pasid, flptr=proc.cr3, slptr=proc.vm.sl_root, did=proc.vm.vm_id)
        for proc in (self.p5, self.p6, self.p9):
            proc.map_range(self.VA, 8)
        self.iommu = Impl(host.mem, host.owners, **kw)
        self.iommu.attach_device(0, self.dir, ats=False)
        self.iommu.attach_device(1, self.dir, ats=True)

    def reinstall(self, pasid, **flags):
        proc = {5: self.p5, 6: self.p6, 9: self.p9}[pasid]
        install_pasid(
            self.host, self.dir, pasid, flptr=proc.cr3, slptr=proc.vm.sl_root, did=proc.vm.vm_id, **flags
        )


@pytest.fixture
def world(Impl):
    return World(Impl)


@pytest.fixture
def make_world(Impl):
    return lambda **kw: World(Impl, **kw)


__all__ = ["World", "SL_R", "SL_W"]
