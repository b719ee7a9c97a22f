"""The audit: invariants checked across every actor's snapshot at a quiescent point (docs/design.md §5).

Each check reads the snapshots only (the host's PASID entries come from the real bytes of
its PASID tables), so the same audit runs after a deterministic run and on a live topology.
A violation names the invariant, the actors, the VM and the PASID involved.

Checked here: I1 isolation (the hot path's inline owner check, counted), I3 lifecycle (PASID
states agree across host, vmm, kvm, vdcm; a free PASID has no entry, cache entry or page
request anywhere), I4 no leaks (nothing of a torn-down VM remains), I5 users counts, I6 no
lost work (every descriptor a live VM submitted was answered definitely), I7 ownership.
I2 coherence: every IOTLB entry agrees with a fresh walk (the host computes it in its snapshot;
a guest that changed a PTE and has not invalidated yet is reported too: the audit runs at
quiescent points, where every change of ours has been flushed).
"""

from __future__ import annotations

from typing import Any

from vsva.ops.topology import HOST, KVM, VDCM, Topology

Violation = dict[str, Any]


def _v(inv: str, what: str, actors: list[str], vm: int | None = None, pasid: int | None = None) -> Violation:
    return {"invariant": inv, "what": what, "actors": actors, "vm": vm, "pasid": pasid}


def audit(snaps: dict[str, dict[str, Any]], topology: Topology) -> list[Violation]:
    """Every violation found; an empty list means the run is clean."""
    host = snaps.get(HOST)
    if not host or "ioasids" not in host:
        return [_v("audit", "no host snapshot", [HOST])]
    devices = topology.spec(HOST).config["devices"]
    phys = {d: c.get("parent", d) for d, c in devices.items()}
    out: list[Violation] = []
    out += _check_host_entries(host)
    vmm_binds = {}
    for name in topology.names("vmm"):
        snap = snaps.get(name, {})
        if "g2h" not in snap:
            if str(topology.spec(name).config["vm"]) not in host["vms"]:
                continue  # a dead VM's vmm cannot answer; I4 (_check_gone) checks what it left
            out.append(_v("audit", "no snapshot", [name]))
            continue
        out += _check_vmm(name, snap, host)
        vmm_binds[name] = snap
    out += _check_users(host, vmm_binds, phys)
    for sub in (KVM, VDCM):
        if sub in snaps and "tables" in snaps[sub]:
            out += _check_subscriber(sub, snaps[sub]["tables"], host, vmm_binds)
    out += [
        _v(
            "I2",
            f"IOTLB entry of domain {e['did']} for page {e['vpn']:#x} holds frame {e['cached']:#x}, "
            f"a fresh walk gives {e['fresh']:#x}"
            if e["fresh"] >= 0
            else "a fresh walk faults",
            [HOST],
            e["did"],
            e["pasid"],
        )
        for e in host.get("stale_iotlb", [])
    ]
    out += _check_isolation(host)
    out += _check_gone(host, snaps, topology)
    out += _check_work(host, snaps, topology)
    return out


def _check_isolation(host: dict[str, Any]) -> list[Violation]:
    """I1 from the hot path's counter; I7 for DMA and page requests under a PASID's old owner."""
    out = []
    if host["counters"].get("owner_violations", 0):
        out.append(
            _v(
                "I1",
                f"{host['counters']['owner_violations']} translation(s) reached a frame "
                "the PASID's VM does not own",
                [HOST],
            )
        )
    for dma in host["dma"].get("foreign", []):
        out.append(
            _v(
                "I7",
                f"DMA by VM {dma['device_vm']}'s device with a PASID VM {dma['owner_vm']} now owns",
                [HOST],
                dma["device_vm"],
                dma["pasid"],
            )
        )
    for req in host["prq"]:
        owner = host["ioasids"].get(str(req["pasid"]), {}).get("vm")
        if owner is not None and req.get("vm") not in (None, owner):
            out.append(
                _v(
                    "I7",
                    f"page request of VM {req['vm']} queued under VM {owner}'s PASID",
                    [HOST],
                    req["vm"],
                    req["pasid"],
                )
            )
    return out


def _check_gone(
    host: dict[str, Any], snaps: dict[str, dict[str, Any]], topology: Topology
) -> list[Violation]:
    """I4: a VM without a domain on the host has nothing left anywhere."""
    out = []
    gone = [vm for vm in topology.vms if str(vm) not in host["vms"]]
    for vm in gone:
        if host["owned_frames"].get(str(vm)):
            out.append(_v("I4", f"{host['owned_frames'][str(vm)]} frame(s) still owned", [HOST], vm))
        out += [
            _v("I4", "IOASID still allocated", [HOST], vm, int(p))
            for p, a in host["ioasids"].items()
            if a["vm"] == vm
        ]
        out += [
            _v("I4", "IOTLB entry left", [HOST], vm, pasid)
            for did, pasid, *_ in host["caches"]["iotlb"]
            if did == vm
        ]
        out += [
            _v("I4", "page request left", [HOST], vm, r["pasid"]) for r in host["prq"] if r.get("vm") == vm
        ]
        for sub in (KVM, VDCM):
            if str(vm) in snaps.get(sub, {}).get("tables", {}):
                out.append(_v("I4", "PASID translations left", [sub], vm))
    return out


def _check_work(
    host: dict[str, Any], snaps: dict[str, dict[str, Any]], topology: Topology
) -> list[Violation]:
    """I6: a live VM's descriptors all got a definite answer (done, failed or aborted)."""
    out = []
    for name in topology.names("guest"):
        vm = topology.spec(name).config["vm"]
        dma = snaps.get(name, {}).get("dma", {})
        if dma.get("indefinite") and str(vm) in host["vms"]:
            out.append(_v("I6", f"{dma['indefinite']} descriptor(s) without a definite outcome", [name], vm))
    return out


def _check_host_entries(host: dict[str, Any]) -> list[Violation]:
    """I3/I7 inside the host: entries, caches and page requests only for bound, owned PASIDs."""
    out = []
    ioasids, svms = host["ioasids"], host["svms"]
    for dev, pasids in host["pasid_entries"].items():
        for pasid in pasids:
            svm = svms.get(str(pasid))
            if svm is None or dev not in svm["devs"]:
                out.append(_v("I3", f"PASID entry on {dev} without a bound svm", [HOST], pasid=pasid))
    for pasid, svm in svms.items():
        for dev in svm["devs"]:
            if int(pasid) not in host["pasid_entries"].get(dev, []):
                out.append(_v("I3", f"svm bound to {dev} but no PASID entry", [HOST], svm["vm"], int(pasid)))
        if ioasids.get(pasid, {}).get("vm") != svm["vm"]:
            out.append(_v("I7", "svm's VM differs from its IOASID's set", [HOST], svm["vm"], int(pasid)))
    for did, pasid, *_ in host["caches"]["iotlb"]:
        owner = ioasids.get(str(pasid), {}).get("vm")
        if owner is None:
            out.append(_v("I3", "IOTLB entry for a free PASID", [HOST], did, pasid))
        elif owner != did:
            out.append(_v("I7", f"IOTLB entry of domain {did} for VM {owner}'s PASID", [HOST], did, pasid))
    for dev, entries in host["caches"]["devtlb"].items():
        for pasid, *_ in entries:
            if str(pasid) not in ioasids:
                out.append(
                    _v("I3", f"device-TLB entry on device {dev} for a free PASID", [HOST], pasid=pasid)
                )
    for req in host["prq"]:
        if str(req["pasid"]) not in svms:
            out.append(_v("I3", "page request queued for an unbound PASID", [HOST], pasid=req["pasid"]))
    depth = host.get("prq_depth")
    if depth is not None and len(host["prq"]) > depth:  # F6: the queue is bounded (overflow auto-responds)
        out.append(_v("I3", f"page request queue holds {len(host['prq'])} entries, depth {depth}", [HOST]))
    for vm, dom in host["vms"].items():
        for pasid in dom["ioasids"]:
            if ioasids.get(str(pasid), {}).get("vm") != int(vm):
                out.append(_v("I7", "VM's IOASID set holds a PASID of another set", [HOST], int(vm), pasid))
    return out


def _check_vmm(name: str, snap: dict[str, Any], host: dict[str, Any]) -> list[Violation]:
    """The vmm's guest->host map and shadow agree with the host's IOASIDs and binds."""
    out, vm = [], snap["vm"]
    allocated = set(host["vms"].get(str(vm), {}).get("ioasids", []))
    for gpasid, hpasid in snap["g2h"].items():
        if hpasid not in allocated:
            out.append(
                _v(
                    "I3",
                    f"vmm maps guest PASID {gpasid} to a PASID its VM does not hold",
                    [name, HOST],
                    vm,
                    hpasid,
                )
            )
    mapped = set(snap["g2h"].values())
    for hpasid in allocated - mapped:
        out.append(_v("I3", "host PASID of the VM unknown to its vmm (leaked)", [name, HOST], vm, hpasid))
    for bind in snap["bound"]:
        if str(bind["hpasid"]) not in host["svms"]:
            out.append(
                _v(
                    "I3",
                    f"vmm believes {bind['dev']} bound, host has no svm",
                    [name, HOST],
                    vm,
                    bind["hpasid"],
                )
            )
    return out


def _check_users(
    host: dict[str, Any], vmms: dict[str, dict[str, Any]], phys: dict[str, str]
) -> list[Violation]:
    """I5: each (PASID, physical device) users count equals the binds the vmms hold."""
    expected: dict[tuple[int, str], int] = {}
    for snap in vmms.values():
        for bind in snap["bound"]:
            key = (bind["hpasid"], phys.get(bind["dev"], bind["dev"]))
            expected[key] = expected.get(key, 0) + 1
    actual = {(int(p), d): u for p, svm in host["svms"].items() for d, u in svm["devs"].items()}
    return [
        _v(
            "I5",
            f"users of {dev} = {actual.get((pasid, dev), 0)}, binds outstanding = "
            f"{expected.get((pasid, dev), 0)}",
            [HOST],
            pasid=pasid,
        )
        for pasid, dev in sorted(set(expected) | set(actual))
        if expected.get((pasid, dev), 0) != actual.get((pasid, dev), 0)
    ]


def _check_subscriber(
    name: str, tables: dict[str, Any], host: dict[str, Any], vmms: dict[str, dict[str, Any]]
) -> list[Violation]:
    """kvm/vdcm translations exist exactly for bound PASIDs, with the host's gpasid and VM.

    A PASID the host is reclaiming for the same VM may still be translated: its FREE has not
    been acknowledged yet, and the hot path drops its DMA as defunct meanwhile."""
    out = []
    reclaiming = host.get("reclaiming", {})
    for vm, table in tables.items():
        for gpasid, entry in table.items():
            svm = host["svms"].get(str(entry["hpasid"]))
            if svm is None and reclaiming.get(str(entry["hpasid"])) == int(vm):
                continue
            if svm is None:
                out.append(
                    _v(
                        "I3",
                        f"{name} translates guest PASID {gpasid} to an unbound PASID",
                        [name, HOST],
                        int(vm),
                        entry["hpasid"],
                    )
                )
            elif svm["vm"] != int(vm):
                out.append(
                    _v(
                        "I7",
                        f"{name} maps VM {vm} to VM {svm['vm']}'s PASID",
                        [name, HOST],
                        int(vm),
                        entry["hpasid"],
                    )
                )
    return out
