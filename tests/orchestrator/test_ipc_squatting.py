"""Over ipc a routing id is public to the run's user (it is the presence file's inode and
ctime), so a same-user process outside the run could claim a name toward a ROUTER its owner
has not connected to yet, and be heard as that actor. The runtime checks who connected: the
kernel records the connecting process (SO_PEERCRED, libzmq's "Peer-Address" property), and a
frame counts only from the launcher or a process it started (vsva.runtime.loop, `_of_run`).

The window is made deterministic: the host is stopped (SIGSTOP) while kvm restarts, so the
host's DEALER cannot reconnect to the new kvm first. An orphaned process (its parent exited:
it descends from no process of the run) then claims "host" toward kvm and sends a BIND
notification: refused (-EPERM, "not the sender"), and kvm's tables stay empty. Once it is
gone the real host's notifications reach kvm again."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

from zmqrt_toys import Script

from vsva.actors import errno as E
from vsva.actors.base import Call
from vsva.ops.launcher import Launcher
from vsva.ops.topology import default_topology

HERE = os.path.dirname(os.path.abspath(__file__))
# The attacker: fork, the first process exits at once (so the second is an orphan), the
# second waits for "go" on stdin, claims `host` toward kvm, prints the answer.
ATTACKER = f"""
import json, os, sys
if os.fork():
    os._exit(0)
sys.path.insert(0, {HERE!r})
from hostile import Raw, incarnation_id
run_dir = sys.argv[1]
sys.stdin.readline()
m = Raw(run_dir, "kvm", "host", listen=False, routing_id=incarnation_id(run_dir, "host"))
note = {{"event": "bind", "vm": 1, "hpasid": 77, "gpasid": 77, "dev": "pf1"}}
answer = m.request("ioasid_notify", note, timeout=5.0)
m.close()
print(json.dumps({{"answer": answer, "ppid": os.getppid()}}), flush=True)
"""


def kvm_state(launcher) -> dict:
    s = Script(steps=[Call("kvm", "snapshot", {}, timeout=5.0)])
    assert launcher.run_actor(s, timeout=10.0)
    return s.result[0]["state"]


def test_a_process_outside_the_run_cannot_claim_a_name_first():
    with Launcher(default_topology(1, workload="bind_many", iterations=2)) as launcher:
        host = launcher.pid("host")
        os.kill(host, signal.SIGSTOP)
        try:
            launcher.kill("kvm")
            assert launcher.wait_exit("kvm", 10.0) is not None
            launcher.restart("kvm")
            attacker = subprocess.Popen(
                [sys.executable, "-c", ATTACKER, launcher.run_dir],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert attacker.wait(10.0) == 0  # reaped: the one left is an orphan now
            attacker.stdin.write("go\n")
            attacker.stdin.flush()
            ready, _, _ = select.select([attacker.stdout], [], [], 20.0)
            assert ready, "the attacker did not report"
            report = json.loads(attacker.stdout.readline())
        finally:
            os.kill(host, signal.SIGCONT)
        assert report["ppid"] != os.getpid()
        assert report["answer"] is not None, "nothing refused it: kvm took the frame as the host's"
        assert report["answer"]["ret"] == -E.EPERM and "not the sender" in report["answer"]["error"]
        state = kvm_state(launcher)
        assert state["tables"] == {} and state["notifier"]["events"] == 0
        # the squatter is gone: the host's own notifications reach kvm (its BINDs)
        boot = Script(
            steps=[
                Call("vm1.vmm", "vm_start", {}, flow="boot"),
                Call("vm1.guest", "start_workload", {}, timeout=60.0),
            ]
        )
        assert launcher.run_actor(boot, timeout=90.0) and boot.result[1]["ret"] == 0, boot.result
        assert kvm_state(launcher)["tables"]["1"]
