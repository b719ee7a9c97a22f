"""The supervisor: keeps a topology running, recovers from deaths, injects faults, serves control.

One supervisor process per live topology (`vsva up`, `python -m vsva.ops.supervisor`), or
in-process for `vsva run`. Its parts:
- loop: the Supervisor, its main loop, the VMs and their workloads, heartbeat, live audit;
- recovery: what is done when an actor dies (the recovery contracts);
- faults: the scheduled faults of a scenario;
- control: the control socket and the checks on its requests;
- statefile: the state file that names the run directory, the control endpoint, the
  supervisor's pid and every actor's pid (rewritten on every restart, removed by down).
"""

from vsva.ops.supervisor.control import CONTROL_OPS, control_request
from vsva.ops.supervisor.loop import Event, Supervisor, SupervisorActor, VmState
from vsva.ops.supervisor.recovery import exit_words
from vsva.ops.supervisor.statefile import ctl_endpoint, state_dir, state_path

__all__ = [
    "CONTROL_OPS",
    "Event",
    "Supervisor",
    "SupervisorActor",
    "VmState",
    "control_request",
    "ctl_endpoint",
    "exit_words",
    "state_dir",
    "state_path",
]
