"""The audit never passes by silence: a live topology whose kvm, vdcm or guest is stopped
(SIGSTOP: alive, but it answers nothing) fails its audit, naming the silent actor; once it
runs again (SIGCONT) the audit is clean."""

from __future__ import annotations

import os
import signal

import pytest
from supervised import supervised

from vsva.ops.control import AUDIT_ANSWER_S
from vsva.ops.topology_file import default_run


@pytest.fixture(scope="module")
def sup():
    with supervised(default_run(1), workloads=False) as s:
        yield s


def audit(sup) -> dict:
    res = sup.run_step(sup.audit_task, timeout=20.0)
    assert res is not None, "the audit did not finish"
    return res


@pytest.mark.parametrize("name", ["kvm", "vdcm", "vm1.guest"])
def test_a_stopped_actor_makes_the_audit_fail_naming_it(sup, name):
    assert audit(sup)["ok"]
    pid = sup.launcher.pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        res = audit(sup)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert res["ok"] is False
    assert res["incomplete"] == [f"{name} did not answer in {AUDIT_ANSWER_S} s"]
    assert name not in res["snapshots"]
    assert audit(sup)["ok"]
