"""Topology files: parsing, validation errors, equivalence with default_topology."""

from __future__ import annotations

import dataclasses
import os

import pytest

from vsva.ops.topology import default_topology
from vsva.ops.topology_file import TopologyError, load, loads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def test_default_example_builds_default_topology():
    run = load(os.path.join(EXAMPLES, "two-vms.toml"))
    assert dataclasses.asdict(run.topology) == dataclasses.asdict(default_topology(2))
    assert run.transport == "ipc" and run.dead_peer_interval == 0.5 and run.faults == []


def test_kernel_key_reaches_the_host():
    from vsva.ops.topology_file import loads

    assert loads('[run]\nkernel = "v5.9"\n').topology.spec("host").config["kernel"] == "v5.9"
    assert loads("").topology.spec("host").config["kernel"] == "v11"


def test_empty_file_is_the_default_topology():
    assert dataclasses.asdict(loads("").topology) == dataclasses.asdict(default_topology(2))


@pytest.mark.parametrize("vms,policy,seed", [(1, "naive", 3), (4, "ordered", 9), (8, "reclaim", 1)])
def test_equivalence_with_options(vms, policy, seed):
    text = f'[run]\nseed = {seed}\npolicy = "{policy}"\nrequest_timeout = 2.5\n' + "".join(
        f'[[vms]]\nid = {i}\nworkload = "dma_loop"\niterations = 7\n' for i in range(1, vms + 1)
    )
    got = loads(text).topology
    want = default_topology(
        vms, seed=seed, policy=policy, request_timeout=2.5, workload="dma_loop", iterations=7
    )
    assert dataclasses.asdict(got) == dataclasses.asdict(want)


def test_examples_parse():
    four = load(os.path.join(EXAMPLES, "four-vms.toml"))
    assert four.topology.vms == [1, 2, 3, 4] and four.on_guest_death[4] == "restart"
    assert four.topology.spec("vm3.guest").config["mdevs"] == []
    assert four.topology.spec("host").config["policy"] == "ordered"
    faults = load(os.path.join(EXAMPLES, "faults.toml"))
    assert [(f.kill, f.at_flow, f.vm, f.nth, f.at_time) for f in faults.faults] == [
        ("vm2.vmm", "F7", 2, 5, None),
        ("vdcm", "F7", 1, 20, None),
        ("kvm", None, None, 1, 0.3),
    ]


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[run]\npolicy = "fifo"', "run.policy: unknown policy 'fifo'; valid: naive, ordered, reclaim"),
        ('[run]\nkernel = "v6.1"', "run.kernel: unknown kernel 'v6.1'; valid: v11, v5.9"),
        ('[run]\npolcy = "naive"', "run: unknown key 'polcy'; valid:"),
        ("[runn]\n", "unknown section 'runn'"),
        ('[run]\nseed = "x"', "run.seed: expected integer"),
        ("[run]\nseed = true", "run.seed: expected integer"),
        ('[run]\ntransport = "udp"', "run.transport: unknown transport 'udp'; valid: ipc, tcp"),
        ("[run]\nrequest_timeout = -1", "run.request_timeout: -1.0 out of range"),
        ("[[vms]]\nid = 2", "vms[0].id: VM ids must be 1..N in order"),
        ('[[vms]]\nworkload = "mine"', "vms[0].workload: unknown workload 'mine'; valid: demo"),
        ("[[vms]]\ncolour = 1", "vms[0]: unknown key 'colour'"),
        ("[[vms]]\ndevices = { passthrough = 2 }", "exactly 1 passthrough"),
        ("[[vms]]\ndevices = { mediated = 1 }", "workload 'demo' needs devices.mediated >= 2"),
        ("[[vms]]\ndevices = { gpu = 1 }", "vms[0].devices: unknown key 'gpu'"),
        ('[[vms]]\non_guest_death = "reboot"', "unknown on_guest_death 'reboot'; valid: stop, restart"),
        ('[[hosts]]\nname = "h1"\n[[hosts]]\nname = "h2"', "2 hosts given"),
        ('[[faults]]\nkill = "vm9.vmm"\nat_time = 1.0', "faults[0].kill: no actor 'vm9.vmm'"),
        ('[[faults]]\nkill = "kvm"', "exactly one trigger"),
        ('[[faults]]\nkill = "kvm"\nat_time = 1.0\nat_flow = "F2"\nvm = 1', "exactly one trigger"),
        ('[[faults]]\nkill = "kvm"\nat_time = 0\nat_flow = "F7"\nvm = 1\nnth = 1', "exactly one trigger"),
        ('[[faults]]\nkill = "kvm"\nat_time = 0\nrandom = true', "exactly one trigger"),
        ('[[faults]]\nkill = "kvm"\nat_flow = "F9"\nvm = 1', "unknown flow step 'F9'"),
        ('[[faults]]\nkill = "kvm"\nat_flow = "F2"', "at_flow needs the VM"),
        ("vms = 3", "vms: expected a non-empty array"),
        ("[[vms]]\niterations = 10000000", "vms[0].iterations: 10000000 out of range [1, 1000000]"),
        (
            "[[vms]]\nram_pages = 128",
            "vms[0].ram_pages: 128 out of range [161, 1048576]; the guest keeps a PASID directory (32 pages)"
            " per device (1 passthrough + 2 mediated)",
        ),
        ("[[vms]]\nram_pages = 352\ndevices = { mediated = 8 }", "vms[0].ram_pages: 352 out of range [353,"),
        ("[run\n", "not valid TOML"),
        ("[[vms]]\nid = 1\nx = " + "[" * 500 + "]" * 500, "nested too deeply"),
        ("x = " + "{a = " * 500 + "1" + "}" * 500, "nested too deeply"),
    ],
)
def test_validation_errors(text, needle):
    with pytest.raises(TopologyError) as err:
        loads(text)
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("mediated,ram_pages", [(3, 1024), (8, 353)])
def test_every_accepted_mediated_count_runs(mediated, ram_pages):
    """The guest keeps room for one PASID directory per device of its VM, however many the
    file gives (it had room for 3: a 4th device's boot failed 'no room for another PASID
    directory'); the smallest RAM the file accepts for them is enough."""
    from vsva.ops.demo import report, run_session

    topology = loads(f"[[vms]]\nram_pages = {ram_pages}\ndevices = {{ mediated = {mediated} }}").topology
    rep = report(run_session(topology, runtime="sim"), topology, "sim")
    assert rep["ok"], (rep["steps"]["failed"], rep["audit"])


@pytest.mark.parametrize("at_time", ["0", "0.0"])
def test_a_fault_at_time_zero_is_a_trigger(at_time):
    """0 is in at_time's range [0, 3600]: the moment the workloads start."""
    (fault,) = loads(f'[[faults]]\nkill = "kvm"\nat_time = {at_time}\nrandom = false').faults
    assert (fault.kill, fault.at_time, fault.at_flow, fault.random) == ("kvm", 0.0, None, False)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[run]\npolicy = "x"\n')
    with pytest.raises(TopologyError, match=r"t\.toml: run\.policy"):
        load(str(path))
    with pytest.raises(TopologyError, match="no such file"):
        load(str(tmp_path / "missing.toml"))


def test_cli_up_refuses_a_bad_file(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.toml"
    path.write_text('[run]\npolicy = "fifo"\n')
    done = subprocess.run(
        [sys.executable, "-m", "vsva", "up", "--detach", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "VSVA_STATE_DIR": str(tmp_path / "state")},
    )
    assert done.returncode == 2
    assert "unknown policy 'fifo'; valid: naive, ordered, reclaim" in done.stderr
