"""The point runners: one module per kind of experiment, each measuring one host stack.

A runner module defines
    DOC       one line for `vsva scale list`
    PARAMS    name -> Param (type, default, range or choices): what a sweep may set or vary
    METRICS   name -> Metric (unit, how a multi-host point combines its hosts, meaning)
    SERIES    name -> meaning of each time series it records (for timeline plots)
    refuse(params) -> str | None   why a point cannot run here (capacity), before it starts
    run_stack(params, seed, ctx) -> StackResult   one host stack, from a clean state to audit
and `PROCESSES = True` when it launches actor processes (then `hosts` runs several stacks).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsva.ops.launcher import StopRequest

RUNNERS = {
    "vms": "vsva.scale.experiments.vms",
    "policies": "vsva.scale.experiments.policies",
    "noisy": "vsva.scale.experiments.noisy",
    "iotlb": "vsva.scale.experiments.iotlb",
}
AGGREGATES = ("sum", "max", "min", "mean")


@dataclass(frozen=True)
class Param:
    type: type
    default: Any
    doc: str
    range: tuple[float, float] | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Metric:
    unit: str
    doc: str
    agg: str = "mean"  # how the hosts of a multi-host point combine: sum | max | min | mean


@dataclass
class StackResult:
    """What one host stack measured. `failures` are reasons other than the audit's (a VM whose
    workload failed, a phase that did not finish); `violations` are the audit's findings."""

    metrics: dict[str, Any] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)
    audit_ran: bool = False
    failures: list[str] = field(default_factory=list)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {t, y, windows}

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "violations": self.violations,
            "audit_ran": self.audit_ran,
            "failures": self.failures,
            "series": self.series,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackResult:
        return cls(**{k: data[k] for k in ("metrics", "violations", "audit_ran", "failures", "series")})


class PointTimeout(Exception):
    """The point's time ran out; the runner records it as `timeout`."""


class PointStopped(Exception):
    """A stop was requested (a signal to `vsva scale run`): the sweep ends, the point is not
    recorded."""


@dataclass
class PointContext:
    """What the runner gives a stack: its deadline, where its run directories go, a way to
    say which phase it is in (the progress display and the Ctrl-C test watch it), and the
    stop request its launchers poll (StopSignals; None: nothing stops it but its deadline)."""

    deadline: float  # time.monotonic() value
    base_dir: str | None = None
    host: int = 0
    on_phase: Callable[[str], None] = lambda phase: None
    stop: StopRequest | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str) -> float:
        """Seconds left; raises PointStopped when a stop was requested, PointTimeout (naming
        `what`) when no time is left."""
        if self.stop is not None and self.stop.check():
            raise PointStopped(f"stopped during {what}")
        left = self.left()
        if left <= 0:
            raise PointTimeout(f"timed out during {what}")
        return left

    def phase(self, name: str) -> None:
        self.on_phase(name)


def runner(name: str) -> ModuleType:
    return importlib.import_module(RUNNERS[name])
