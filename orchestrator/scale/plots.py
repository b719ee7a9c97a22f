"""PNG plots of a results directory, one per [[plots]] entry of its sweep (matplotlib, optional).

lines     one panel per metric: the median over repeats against the x parameter, a band from
          the minimum to the maximum, one line per combination of the other varied parameters
          (those `where` does not fix); every run that was not
          ok is drawn as a red cross at its value (at the panel's floor when it has none), so a
          failed, timed-out, leaked or refused point is visible, never dropped.
timeline  one panel per point (of those `where` selects; the first repeat that recorded the
          series): the series over
          time, with its fault windows shaded (a VMM kill until its teardown finished), as
          Jepsen's latency plots shade nemesis windows.

Panels are PANEL_W x PANEL_H inches at DPI; `size(plot, panels)` is the PNG's pixel size.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from vsva.scale.results import ResultsDir, group, spread
from vsva.scale.sweep import Plot, Sweep

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_W, PANEL_H, DPI = 5.0, 3.6, 100
MAX_TIMELINE_PANELS = 8
NO_MATPLOTLIB = (
    "matplotlib is not installed, so no plots were drawn: pip install -e '.[plots]', "
    "then `vsva scale plot DIR`"
)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def grid(panels: int) -> tuple[int, int]:
    cols = min(panels, 3) if panels > 0 else 1
    return cols, max(1, math.ceil(panels / cols))


def size(panels: int) -> tuple[int, int]:
    """Pixel width and height of a figure of `panels` panels."""
    cols, rows = grid(panels)
    return int(round(cols * PANEL_W * DPI)), int(round(rows * PANEL_H * DPI))


def panels_of(plot: Plot, rows: list[dict[str, Any]], series_rows: list[dict[str, Any]]) -> int:
    """How many panels `plot` has for these rows (with `size`, the PNG's expected pixels)."""
    if plot.kind == "lines":
        return len(plot.y)
    return min(MAX_TIMELINE_PANELS, len(_timeline_runs(plot, rows, series_rows)))


def draw_all(rd: ResultsDir, sweep: Sweep) -> dict[str, Any]:
    if not sweep.plots:
        return {"plots": []}
    if not available():
        return {"plots": [], "note": NO_MATPLOTLIB}
    import matplotlib

    matplotlib.use("Agg")
    rows, series_rows = rd.rows(), rd.series()
    drawn = []
    for plot in sweep.plots:
        path = os.path.join(rd.path, f"{plot.name}.png")
        if (lines if plot.kind == "lines" else timeline)(plot, sweep, rows, series_rows, path):
            drawn.append(path)
    return {"plots": drawn}


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    import matplotlib.pyplot as plt

    cols, nrows = grid(panels)
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * PANEL_W, nrows * PANEL_H), dpi=DPI, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox="tight": the pixel size stays size(panels)
    plt.close(fig)


def selected(plot: Plot, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if all(r["params"].get(k) == v for k, v in plot.where.items())]


def line_key(plot: Plot, sweep: Sweep, row: dict[str, Any]) -> str:
    """A line's label: the varied parameters other than x and those fixed by `where`."""
    return ", ".join(f"{k}={row['params'].get(k)}" for k in sweep.vary if k != plot.x and k not in plot.where)


def lines(plot: Plot, sweep: Sweep, rows: list[dict[str, Any]], _series: Any, path: str) -> bool:
    rows = selected(plot, rows)
    if not rows:
        return False
    fig, axes = _figure(len(plot.y))
    keys = list(dict.fromkeys(line_key(plot, sweep, r) for r in rows))
    for ax, metric in zip(axes, plot.y):
        for key in keys:
            xs, med, lo, hi = [], [], [], []
            for runs in group([r for r in rows if line_key(plot, sweep, r) == key]).values():
                s = spread(r["metrics"].get(metric) for r in runs)
                if s is not None:
                    xs.append(runs[0]["params"][plot.x])
                    med.append(s[0])
                    lo.append(s[1])
                    hi.append(s[2])
            order = sorted(range(len(xs)), key=lambda i: _key(xs[i]))
            xs, med, lo, hi = ([v[i] for i in order] for v in (xs, med, lo, hi))
            if xs:
                (line,) = ax.plot(xs, med, marker="o", label=key or None)
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        _mark_failures(ax, rows, plot.x, metric)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(plot.x)
        ax.set_ylabel(plot.ylabel)
        if plot.logx:
            ax.set_xscale("log", base=2)
        if plot.logy and _positive(ax):
            ax.set_yscale("log")
        if any(keys) or any(r["status"] != "ok" for r in rows):
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(plot.y) :]:
        ax.set_visible(False)
    where = ", ".join(f"{k}={v}" for k, v in plot.where.items())
    fig.suptitle((plot.title or f"{sweep.name}: {plot.name}") + (f" ({where})" if where else ""), fontsize=11)
    _save(fig, path)
    return True


def _positive(ax: Axes) -> bool:
    """A log scale needs data above zero (a panel of failed runs only may have none)."""
    import numpy as np

    ys = (np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines())  # None: nan
    return any(bool((y > 0).any()) for y in ys)


def _key(x: Any) -> Any:
    return (0, x) if isinstance(x, (int, float)) else (1, str(x))


def _mark_failures(ax: Axes, rows: list[dict[str, Any]], x: str, metric: str) -> None:
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return
    floor = ax.get_ylim()[0]
    xs = [r["params"][x] for r in bad]
    ys = [
        r["metrics"].get(metric) if isinstance(r["metrics"].get(metric), (int, float)) else floor for r in bad
    ]
    ax.scatter(
        xs,
        ys,
        marker="x",
        color="red",
        s=60,
        zorder=5,
        label=f"not ok ({', '.join(sorted({r['status'] for r in bad}))})",
    )


def _timeline_runs(
    plot: Plot, rows: list[dict[str, Any]], series_rows: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, series) for each point's first run that recorded one of the plot's series."""
    by_run = {(s["point_id"], s["repeat"]): s["series"] for s in series_rows}
    out = []
    for runs in group(selected(plot, rows)).values():
        for r in runs:
            rec = by_run.get((r["point_id"], r["repeat"]), {})
            if any(name in rec for name in plot.y):
                out.append((r, rec))
                break
    return out


def timeline(
    plot: Plot, sweep: Sweep, rows: list[dict[str, Any]], series_rows: list[dict[str, Any]], path: str
) -> bool:
    runs = _timeline_runs(plot, rows, series_rows)[:MAX_TIMELINE_PANELS]
    if not runs:
        return False
    fig, axes = _figure(len(runs))
    for ax, (row, rec) in zip(axes, runs):
        shaded = set()
        for name in plot.y:
            s = rec.get(name)
            if not s:
                continue
            ax.plot(s["t"], s["y"], marker=".", linestyle="-", linewidth=0.6, markersize=3, label=name)
            for t0, t1, what in s.get("windows", []):
                ax.axvspan(t0, t1, color="red", alpha=0.15, label=None if what in shaded else what)
                shaded.add(what)
        status = "" if row["status"] == "ok" else f" [{row['status']}]"
        ax.set_title(
            f"{row['point_id']} #{row['repeat']}{status}", fontsize=9, color="black" if not status else "red"
        )
        ax.set_xlabel("s since the run started")
        ax.set_ylabel(plot.ylabel)
        if plot.logy and _positive(ax):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.suptitle(plot.title or f"{sweep.name}: {plot.name}", fontsize=11)
    _save(fig, path)
    return True
