"""`--cluster ADDRESS`: a sweep's host stacks as Ray tasks, one whole node each (the `[cluster]` extra).

Every host stack of every run (a point with `hosts = H` has H) is one task pinned to one node
(NodeAffinitySchedulingStrategy, hard) that reserves all of that node's CPUs, so two stacks
never share a node and disturb each other's figures. Stacks are handed out as nodes become
free; a run's row is written to the caller's results directory as soon as its last stack
has returned, so results stream back while the sweep goes on. In the task the stack runs as
it does locally (its own run directories under a fresh base directory on that node), and the
residue check runs there too. On a stop request (SIGINT, SIGTERM, SIGHUP to `vsva scale run`)
the outstanding tasks are cancelled (KeyboardInterrupt in the task: the stack's launcher
cleans up on that node).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from vsva.scale.experiments import PointStopped

if TYPE_CHECKING:
    from vsva.ops.launcher import StopRequest

POLL_S = 1.0  # ray.wait slice, so a stop request is seen between completions


class ClusterError(RuntimeError):
    """Ray is missing or the cluster cannot be used; the message says which."""


def check_available() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ClusterError("--cluster needs Ray: pip install -e '.[cluster]'") from None


def connect(address: str) -> Any:
    """ray.init on `address` (idempotent); returns the ray module. ray.init takes SIGTERM over
    (it exits at once); it is given back to the handler it had (the sweep's stop request)."""
    check_available()
    import ray

    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, ignore_reinit_error=True)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: Ray's own wording
        raise ClusterError(f"--cluster {address}: cannot connect: {str(exc).splitlines()[0]}") from None
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    return ray


def stack_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: one host stack from a clean state, then what it left behind."""
    import platform
    import shutil
    import tempfile

    from vsva.scale.environment import sample
    from vsva.scale.runner import short_tmp
    from vsva.scale.stacks import residue, run_stack_spec

    base = tempfile.mkdtemp(prefix="vsva-s", dir=short_tmp())
    try:
        outcome = run_stack_spec({**spec, "base_dir": base})
    finally:
        left = residue(base)
        shutil.rmtree(base, ignore_errors=True)
    return {"outcome": outcome, "left": left, "node": platform.node(), "env": sample()}


def _nodes(ray: Any) -> list[dict[str, Any]]:
    nodes = [
        {"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)}
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1
    ]
    if not nodes:
        raise ClusterError("the cluster has no live node with a CPU")
    return nodes


def run_on_cluster(
    sweep: Any, todo: list[Any], address: str, rd: Any, progress: Any, stop: StopRequest | None = None
) -> None:
    ray = connect(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from vsva.scale.experiments import runner
    from vsva.scale.runner import make_row, refused_row, stack_specs

    remote = ray.remote(stack_task)
    free = _nodes(ray)
    progress.line(f"cluster {address}: {len(free)} nodes, {sum(n['cpus'] for n in free):g} CPUs")
    env = rd.meta().get("env", {})
    queue: list[tuple[Any, int, dict[str, Any]]] = []
    state: dict[int, dict[str, Any]] = {}
    for i, run in enumerate(todo):
        why = runner(sweep.runner).refuse(run.params)
        if why:
            row = refused_row(sweep, run, why, env)
            rd.append(row)
            progress.finish(run, row)
            continue
        specs = stack_specs(sweep, run, None)
        state[i] = {
            "run": run,
            "results": [None] * len(specs),
            "started": time.time(),
            "t0": time.monotonic(),
        }
        queue += [(i, h, spec) for h, spec in enumerate(specs)]
    pending: dict[Any, tuple[int, int, dict[str, Any]]] = {}
    try:
        while queue or pending:
            if stop is not None and stop.check():
                raise PointStopped("stopped while the cluster ran the sweep")
            while queue and free:
                i, h, spec = queue.pop(0)
                node = free.pop(0)
                ref = remote.options(
                    num_cpus=node["cpus"],
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["id"], soft=False),
                ).remote(spec)
                pending[ref] = (i, h, node)
                if h == 0:
                    progress.start(state[i]["run"])
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in done:
                i, h, node = pending.pop(ref)
                free.append(node)
                result = _result(ray, ref)
                result["node"] = f"{result['node']}/{node['id'][:12]}"
                state[i]["results"][h] = result
                if all(r is not None for r in state[i]["results"]):
                    _record(sweep, state.pop(i), rd, progress, make_row)
    except PointStopped:
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=30)
        raise
    finally:
        ray.shutdown()


def _result(ray: Any, ref: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = ray.get(ref)
        return result
    except Exception as exc:  # the task's worker died, or the task raised past its own handler
        return {
            "outcome": {"error": f"ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"},
            "left": [],
            "node": "?",
            "env": {},
        }


def _record(sweep: Any, st: dict[str, Any], rd: Any, progress: Any, make_row: Any) -> None:
    results = st["results"]
    env: dict[str, Any] = next((r["env"] for r in results if r["env"]), {})
    row, series = make_row(
        sweep,
        st["run"],
        [r["outcome"] for r in results],
        [x for r in results for x in r["left"]],
        st["started"],
        time.monotonic() - st["t0"],
        env,
        nodes=[r["node"] for r in results],
    )
    rd.append(row, series)
    progress.finish(st["run"], row)
