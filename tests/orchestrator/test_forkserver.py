"""The fork server: actors forked from a zygote are supervised exactly like children of the
launcher (pidfd death detection, SIGKILL, restart, exit codes, no zombies); nothing that
must not cross a fork (a zmq context, a thread) can; without it, one interpreter per actor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message
from zmqrt_toys import TOYS, Script, pid_alive

from vsva.actors.base import Call
from vsva.ops import launcher as launcher_mod
from vsva.ops.launcher import Launcher
from vsva.ops.topology import ActorSpec, Topology

ROOT = os.path.dirname(os.path.dirname(TOYS))


def topology():
    return Topology(
        actors=[ActorSpec("echo", "zmqrt_toys:Echo"), ActorSpec("mute", "zmqrt_toys:Mute")], mem_frames=8
    )


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def state_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


UNSAFE = {
    "zmq context with a socket": "import zmq; s = zmq.Context().socket(zmq.DEALER)",
    "python thread": "import threading; threading.Thread(target=threading.Event().wait).start()",
    "global zmq context": "import zmq; zmq.Context.instance()",
}


@pytest.mark.parametrize("what", sorted(UNSAFE))
def test_check_forkable_fires_when_something_would_cross_the_fork(what):
    code = textwrap.dedent(f"""
        import os, sys
        from vsva.runtime.zygote import ForkUnsafe, check_forkable
        check_forkable()  # a fresh interpreter is safe
        {UNSAFE[what]}
        try:
            check_forkable()
        except ForkUnsafe as exc:
            print("refused:", exc, flush=True)
            os._exit(0)
        os._exit(1)
    """)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused" in done.stdout


def test_zygote_refuses_a_spawn_while_a_context_is_live():
    """The serve loop runs the check before every fork: a request is answered with an error
    and no child appears."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = textwrap.dedent(f"""
        import socket, zmq
        sock = zmq.Context().socket(zmq.DEALER)
        from vsva.runtime.zygote import serve
        serve(socket.socket(fileno={theirs.fileno()}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        ours.settimeout(20)
        ours.send(json.dumps({"spawn": ["a"], "run_dir": "/nonexistent"}).encode())
        reply = json.loads(ours.recv(4096))
        assert "cannot fork" in reply["error"] and "threads" in reply["error"]
        ours.send(b"not json")
        assert "bad request" in json.loads(ours.recv(4096))["error"]
    finally:
        ours.close()  # end of file: the zygote exits
        assert proc.wait(20) == 0


def test_forked_actors_are_supervised_as_before():
    with Launcher(topology(), extra_path=[TOYS], fork=True) as launcher:
        zygote = launcher.forkserver.pid
        pids = {r["name"]: r["pid"] for r in launcher.processes()}
        assert all(parent_of(pid) == zygote for pid in pids.values())
        assert launcher.run_actor(Script(steps=[Call("echo", "ping", {"x": 1})]), timeout=10)
        os.kill(pids["mute"], signal.SIGKILL)  # from outside, like `kill -9 PID`
        assert launcher.poll_deaths(timeout=5.0) == [("mute", -signal.SIGKILL)]
        assert state_of(pids["mute"]) is None  # reaped by the zygote: no zombie
        assert launcher.kill("echo", signal.SIGTERM)
        assert launcher.wait_exit("echo", 5.0) == 0
        new = launcher.restart("mute")
        assert new != pids["mute"] and parent_of(new) == zygote
        assert launcher.processes()[1]["state"] == "running"
        run_dir, shm = launcher.run_dir, launcher.shm_path
    assert not pid_alive(new) and not pid_alive(zygote)
    assert not os.path.exists(run_dir) and not os.path.exists(shm)


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.update(int(c) for c in f.read().split())
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: the zygote forks alone")
def test_a_batch_forked_by_helpers_is_the_zygotes_and_in_order():
    """A batch of at least 2 x MIN_PER_FORKER actors is forked by the zygote and a helper at
    once (vsva.runtime.zygote). By the time the actors run, every one is the zygote's child
    (the helper's adopted: PR_SET_CHILD_SUBREAPER) and the helper is gone; each pid is the
    one its name got (the launcher checks every ready message's pid against it); an actor
    the helper forked dies, is seen and reaped like any other."""
    names = [f"echo{i}" for i in range(40)]
    topo = Topology(actors=[ActorSpec(n, "zmqrt_toys:Echo") for n in names], mem_frames=8)
    with Launcher(topo, extra_path=[TOYS], fork=True) as launcher:
        zygote = launcher.forkserver.pid
        pids = [launcher.pid(n) for n in names]
        forkers = [launcher.procs[n].child.forker for n in names]
        assert forkers[0] == zygote and len(set(forkers)) == 2  # the first half is the zygote's
        assert children_of(zygote) == set(pids)  # the helper is gone, its children adopted
        assert all(parent_of(pid) == zygote for pid in pids)
        last = names[-1]  # in the helper's half of the batch
        assert launcher.run_actor(Script(steps=[Call(last, "ping", {"x": 1})]), timeout=10)
        os.kill(launcher.pid(last), signal.SIGKILL)
        assert launcher.poll_deaths(timeout=5.0) == [(last, -signal.SIGKILL)]
        assert state_of(pids[-1]) is None  # reaped by the zygote: no zombie
    assert not any(pid_alive(pid) for pid in pids) and not pid_alive(zygote)


def test_fallback_starts_interpreters_and_logs_once(monkeypatch):
    monkeypatch.setenv("VSVA_NO_FORKSERVER", "1")
    monkeypatch.setattr(launcher_mod, "_FALLBACK_LOGGED", False)
    first, second = Launcher(topology(), extra_path=[TOYS]), Launcher(topology(), extra_path=[TOYS])
    assert not first.fork and not second.fork
    assert any("one interpreter per actor" in m for m in first.messages)
    assert not any("one interpreter per actor" in m for m in second.messages)
    with first:
        assert first.forkserver is None
        pids = {r["name"]: r["pid"] for r in first.processes()}
        assert all(parent_of(pid) == os.getpid() for pid in pids.values())
        os.kill(pids["echo"], signal.SIGKILL)
        assert first.poll_deaths(timeout=5.0) == [("echo", -signal.SIGKILL)]
        assert parent_of(first.restart("echo")) == os.getpid()


def test_a_restart_that_reports_ready_before_the_launcher_looks_is_seen(monkeypatch):
    """The restarted incarnation connects and reports ready while the launcher has not touched
    its control socket since the launch (a launcher descheduled between the fork and its
    wait: a loaded machine). Its ready must be seen: the control ROUTER still held the dead
    incarnation's routing id, and with one id per actor it dropped the new one's ready
    (the child waited for a go that never came: "not ready within ..." with an empty log).

    The wait for the child is on a monitor of the control socket: libzmq's I/O thread posts
    each handshake there itself, so the ROUTER is not touched (it would take in the dead
    incarnation's teardown first, and the race would be gone)."""
    prepare, await_ready = Launcher._prepare, Launcher._await_ready
    monitors = []

    def with_a_monitor(self):
        prepare(self)
        monitors.append(self.ctl.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))

    def after_the_children_reported(self, names, timeout):
        for n in range(len(names)):
            assert monitors[0].poll(10_000), f"{len(names) - n} of {names} never connected to report ready"
            assert recv_monitor_message(monitors[0])["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        return await_ready(self, names, timeout)

    monkeypatch.setattr(Launcher, "_prepare", with_a_monitor)
    monkeypatch.setattr(Launcher, "_await_ready", after_the_children_reported)
    with Launcher(topology(), extra_path=[TOYS], fork=True, ready_timeout=5.0) as launcher:
        for _ in range(3):  # (the monitor closes with the launcher's context)
            old = launcher.pid("echo")
            assert launcher.kill("echo")
            assert launcher.poll_deaths(timeout=5.0) == [("echo", -signal.SIGKILL)]
            assert launcher.restart("echo", timeout=5.0) != old
            assert launcher.run_actor(Script(steps=[Call("echo", "ping", {"x": 1})]), timeout=10)


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_helper_that_fails_leaves_an_error_for_each_name_it_did_not_answer(how, monkeypatch):
    """The zygote passes a helper's replies on in order (`_forward`); a helper that dies or
    stalls after its first reply costs one bounded wait at most, then each name it did not
    answer gets an error (the launcher's spawn fails with it instead of timing out), and the
    helper is killed and reaped."""
    from vsva.runtime import zygote

    monkeypatch.setattr(zygote, "_adopt_orphans", lambda: False)  # the test's process stays as it is
    monkeypatch.setattr(zygote, "FORWARD_TIMEOUT", 0.5)
    waits = []
    readable = zygote.readable
    monkeypatch.setattr(
        zygote, "readable", lambda fd, timeout: waits.append(timeout) or readable(fd, timeout)
    )

    launcher_end, ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = zygote._Server(ctl)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hold_r, hold_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # the helper: one reply (with an fd, as a pidfd would be), then its end
        null = os.open(os.devnull, os.O_RDONLY)
        socket.send_fds(theirs, [json.dumps({"pid": 4242, "forker": os.getpid()}).encode()], [null])
        if how == "stalls":
            os.read(hold_r, 1)
        os._exit(0)
    theirs.close()
    server.links.append(ours)
    try:
        server._forward(helper, ours, ["a", "b", "c"])
        replies = []
        for _ in range(3):
            data, fds, _, _ = socket.recv_fds(launcher_end, 4096, 1)
            replies.append(json.loads(data))
            for fd in fds:
                os.close(fd)
        assert replies[0] == {"pid": 4242, "forker": helper}
        assert [r.get("error") for r in replies[1:]] == [
            f"{n}: cannot fork: the forking helper failed" for n in ("b", "c")
        ]
        assert len(waits) == 2  # the reply, then the end (or the timeout): no wait per name after
        assert 4242 in server.children and not server.links
        assert state_of(helper) is None  # killed (if it stalled) and reaped
    finally:
        for fd in (hold_r, hold_w, server._wake_r, server._wake_w):
            os.close(fd)
        for sock in (launcher_end, ctl):
            sock.close()


def test_an_early_child_runs_while_the_batch_is_held(monkeypatch):
    """The first `early` names of a batch run as soon as they are forked; the others wait
    for the end of the batch's forking (the hold pipe's end of file). Forked here: a child
    forked held, then one forked early; the early one runs while the hold is still open."""
    from vsva.runtime import zygote

    monkeypatch.setattr(zygote, "_adopt_orphans", lambda: False)
    monkeypatch.setattr(
        zygote, "check_forkable", lambda: None
    )  # pytest-xdist's threads: the child only writes
    ran_r, ran_w = os.pipe()
    launcher_end, ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = zygote._Server(ctl)
    monkeypatch.setattr(server, "_child", lambda name, *rest: (os.write(ran_w, name.encode()), os._exit(0)))
    hold_r, hold_w = os.pipe()
    try:
        server._fork("h", "/nonexistent", None, hold_r, hold_w, ctl)
        server._fork("e", "/nonexistent", None, hold_r, hold_w, ctl, held=False)
        assert zygote.readable(ran_r, 10.0) and os.read(ran_r, 1) == b"e"  # the hold is still open
        os.close(hold_w)
        hold_w = -1
        assert zygote.readable(ran_r, 10.0) and os.read(ran_r, 1) == b"h"
        for pid in server.children:
            assert os.waitpid(pid, 0)[1] == 0
    finally:
        for fd in (hold_r, hold_w, ran_r, ran_w, server._wake_r, server._wake_w):
            if fd >= 0:
                os.close(fd)
        for sock in (launcher_end, ctl):
            sock.close()


def test_the_launcher_forks_the_shared_actors_first_and_early(monkeypatch):
    """host, kvm and vdcm serve every VM and have the most start-up work: the launcher asks
    for them first, to run at once, and each actor still gets its own pid (the launcher
    checks every ready message's pid against its name's)."""
    from vsva.ops.forkserver import ForkServer
    from vsva.ops.topology import default_topology

    asked = []
    spawn_many = ForkServer.spawn_many
    monkeypatch.setattr(
        ForkServer,
        "spawn_many",
        lambda self, names, run_dir, early=0: (
            asked.append((list(names), early)) or spawn_many(self, names, run_dir, early)
        ),
    )
    topology = default_topology(2)
    topology.actors.reverse()  # a topology file may list them in any order
    with Launcher(topology, fork=True) as launcher:
        pids = {name: launcher.pid(name) for name in topology.names()}
    ((names, early),) = asked
    assert names[:3] == ["vdcm", "kvm", "host"] and early == 3
    assert sorted(names) == sorted(topology.names()) and len(set(pids.values())) == len(pids)


def test_forked_actors_import_nothing_after_the_fork(monkeypatch):
    """What the zygote preloads is all an actor imports through a whole demo run: an import
    after the fork would be paid again by every child, on the start-up's critical path (the
    host's lazy hot path was: ~30 ms of the slowest actor). Python reports every import
    with PYTHONPROFILEIMPORTTIME, which a forked child inherits; its stderr is its log."""
    from vsva.ops.demo import Controller
    from vsva.ops.topology import default_topology

    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    topology = default_topology(1)
    with Launcher(topology) as launcher:
        assert launcher.forkserver is not None
        controller = Controller(topology)
        launcher.run_actor(controller, timeout=60)
        launcher.close()
        logs = launcher.logs()
    result = controller.result
    assert result is not None and not result["violations"], result
    assert [w["ret"] for w in result["workloads"].values()] == [0], result["workloads"]
    late = {name: [ln for ln in text.splitlines() if "import time:" in ln] for name, text in logs.items()}
    assert set(late) == {a.name for a in topology.actors}
    assert not any(late.values()), late
