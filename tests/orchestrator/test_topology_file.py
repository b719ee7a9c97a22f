"""Topology files: parsing, validation errors, equivalence with default_topology."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from vsva.ops.topology import MAX_RAM_PAGES, default_topology
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
    assert loads("[run]\n").topology.spec("host").config["kernel"] == "v11"


def test_a_file_of_empty_sections_is_the_default_topology():
    assert dataclasses.asdict(loads("[run]\n[scenario]\n").topology) == dataclasses.asdict(
        default_topology(2)
    )


@pytest.mark.parametrize("command", ["up", "run"])
@pytest.mark.parametrize("text", ["", "\n  \n", "# a topology, one day\n\n# seed = 3\n"])
def test_a_file_that_defines_nothing_is_refused(tmp_path, command, text):
    """An empty file (or one of comments) silently ran the default topology: most likely the
    wrong file, or one not written yet; the default topology is had by giving no file."""
    assert_refused(
        tmp_path,
        command,
        text,
        "defines nothing (no faults, hosts, run, scenario, vms); omit the file for the default topology",
    )


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
        (
            '[[vms]]\nworkload = "churn"\ndevices = { mediated = 0 }',
            "vms[0]: workload 'churn' needs devices.mediated >= 1",
        ),
        (
            '[[vms]]\nworkload = "bind_many"\nquota = 8\niterations = 9',
            "vms[0]: workload 'bind_many' keeps the PASID of every round: iterations (9) must be at most quota (8)",
        ),
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
            "vms[0].ram_pages: 128 out of range [161, 131072]; the guest keeps a PASID directory (32 pages)"
            " per device (1 passthrough + 2 mediated)",
        ),
        ("[[vms]]\nram_pages = 352\ndevices = { mediated = 8 }", "vms[0].ram_pages: 352 out of range [353,"),
        ("[[faults]]\nrandom = true\nwindow = -1", "faults[0].window: -1 out of range [0, 3600]"),
        (
            '[[vms]]\nworkload = "fault_loop"\niterations = 4000\nram_pages = 226',
            "vms[0].ram_pages: 226 out of range [227, 131072]; the guest keeps a PASID directory (32 pages) per "
            "device (1 passthrough + 2 mediated) and a workload maps up to 64 pages, and 'fault_loop' keeps 66 "
            "table pages for 4000 iterations",
        ),
        (
            '[[vms]]\nworkload = "bind_many"\niterations = 4097\nquota = 4097\n' * 2,
            "vms: the workloads keep 8194 PASIDs bound in all (iterations of bind_many); at most 8192: the host's "
            "snapshot of every binding (the audit's) travels in one message of at most 1048576 bytes",
        ),
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


def test_fault_loop_runs_in_the_least_ram_accepted_for_its_iterations():
    """fault_loop keeps a page table a 64 rounds: 4000 rounds outgrew the RAM accepted for
    any workload (161 pages: the F7 fill's page request failed, 'page response 2')."""
    from vsva.ops.demo import report, run_session

    topology = loads('[[vms]]\nworkload = "fault_loop"\niterations = 4000\nram_pages = 227').topology
    rep = report(run_session(topology, runtime="sim"), topology, "sim")
    assert rep["ok"], (rep["steps"]["failed"], rep["audit"])


def test_bind_many_keeping_the_most_pasids_accepted_runs():
    """2 x 4096 PASIDs kept bound, the most accepted: the host's snapshot of 20000 was 1.19 MB,
    more than a message holds, and the audit had none (the deterministic runtime raised)."""
    from vsva.ops.demo import report, run_session

    vm = '[[vms]]\nworkload = "bind_many"\niterations = 4096\nquota = 4096\n'
    topology = loads(vm * 2).topology
    rep = report(run_session(topology, runtime="sim"), topology, "sim")
    assert rep["ok"], (rep["steps"]["failed"], rep["audit"])


def test_two_vms_of_the_largest_accepted_ram_run():
    """The shared memory holds each VM's second-level tables, however large its RAM: 16
    frames a VM held ~8 MiB of RAM's tables, so the second of two VMs of 131072 pages found
    too few frames left (vfio_open: 'ram_pages or quota out of range')."""
    from vsva.ops.demo import report, run_session

    vm = f'[[vms]]\nram_pages = {MAX_RAM_PAGES}\nworkload = "dma_loop"\niterations = 1\n'
    topology = loads(vm + vm).topology
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


def assert_refused(tmp_path, command: str, text: str, line: str) -> None:
    """`vsva <command> FILE` with this text exits 2 with exactly `line` on stderr (after
    'vsva: FILE: ') and leaves nothing: no shared-memory file of its pid, no run directory
    in its TMPDIR (a short one: socket paths), no state file. A run it did start is taken down."""
    path, state = tmp_path / "t.toml", tmp_path / "state"
    path.write_text(text)
    tmp = tempfile.mkdtemp(prefix="vt", dir="/tmp")
    env = {**os.environ, "VSVA_STATE_DIR": str(state), "TMPDIR": tmp}
    detach = ["--detach"] if command == "up" else []
    argv = [sys.executable, "-m", "vsva", command, *detach, str(path)]
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, err.splitlines(), out) == (2, [f"vsva: {path}: {line}"], "")
        assert glob.glob(f"/dev/shm/vsva-{proc.pid}.*") == [] and os.listdir(tmp) == []
        assert not os.path.exists(state / "current.json")
    finally:
        if os.path.exists(state / "current.json"):
            subprocess.run([sys.executable, "-m", "vsva", "down"], cwd=ROOT, env=env, timeout=60, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("command", ["up", "run"])
def test_ram_larger_than_one_message_holds_is_refused(tmp_path, command):
    """A guest's RAM frame list travels whole in one message (vm_start's reply, vm_info) of
    at most MAX_FRAME bytes. Up to 1 << 20 pages were accepted; from about 209000 (5 bytes a
    frame number) the reply did not fit and the run failed ('no workload result') after
    making a shared-memory file of the full size (4.3 GB at 1 << 20 pages). The limit keeps
    a margin below that: 131072 pages (512 MiB)."""
    assert_refused(
        tmp_path,
        command,
        "[[vms]]\nram_pages = 131073\n",
        "vms[0].ram_pages: 131073 out of range [161, 131072]; the guest's RAM frame list "
        "(up to 5 bytes a page) travels in one message of at most 1048576 bytes",
    )


@pytest.mark.parametrize(
    "fault,line",
    [
        (
            'kill = "kvm"\nat_time = 30',
            "faults[0].at_time: 30 s is not before scenario.timeout (30 s), when the run has ended",
        ),
        (
            "random = true\nwindow = 45.5",
            "faults[0].window: the random time in [0, 45.5) s may fall after scenario.timeout (30 s), "
            "when the run has ended",
        ),
    ],
)
def test_run_refuses_a_fault_timed_after_its_timeout(tmp_path, fault, line):
    """vsva run ends at scenario.timeout: such a fault was accepted and only reported 'not
    fired' at the end of a run that had waited for it until the timeout."""
    assert_refused(tmp_path, "run", f"[[faults]]\n{fault}\n[scenario]\ntimeout = 30\n", line)


def test_a_live_topology_takes_a_fault_at_any_time():
    """vsva up runs until down: scenario.timeout is not its end, an at_time past it fires."""
    (fault,) = loads('[[faults]]\nkill = "kvm"\nat_time = 90\n[scenario]\ntimeout = 30\n').faults
    assert fault.at_time == 90.0
