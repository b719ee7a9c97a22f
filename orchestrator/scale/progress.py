"""Progress on stderr: a rich bar on a terminal (runs done/total, the current point and its
phase, elapsed, ETA), plain lines otherwise (one when a run starts, one per phase, one when
it ends), which scripts and tests can wait on."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, done: int = 0, *, live: bool | None = None):
        self.total = total
        self.done = done
        self.live = sys.stderr.isatty() if live is None else live
        self.t0 = time.monotonic()
        self.current = ""
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total, completed=self.done)
        else:
            self.line(f"{self.done}/{self.total} runs done")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def line(self, text: str) -> None:
        print(f"scale: {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line that stays, also under the bar (why the sweep stopped)."""
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            self.line(text)

    def _describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def start(self, run: Any) -> None:
        self.current = f"{run.point_id} #{run.repeat}"
        self._describe(self.current)
        if not self.live:
            self.line(f"run {self.done + 1}/{self.total} started: {self.current}")

    def phase(self, phase: str) -> None:
        self._describe(f"{self.current}: {phase}")
        if not self.live:
            self.line(f"run {self.done + 1}/{self.total} {self.current}: {phase}")

    def finish(self, run: Any, row: dict[str, Any]) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        mark = row["status"] + (f" ({row['reason']})" if row.get("reason") else "")
        if self._bar is not None and row["status"] != "ok":
            self.note(f"{run.point_id} #{run.repeat}: {mark}")
        if not self.live:
            elapsed = time.monotonic() - self.t0
            self.line(
                f"run {self.done}/{self.total} finished: {run.point_id} #{run.repeat}: {mark} "
                f"({row['elapsed_s']:.1f} s; {elapsed:.0f} s elapsed)"
            )
