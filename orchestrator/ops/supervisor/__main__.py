"""The detached supervisor process of `vsva up`: `python -m vsva.ops.supervisor`."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from vsva.ops.supervisor.loop import Supervisor

EXIT_HOST_LOST = 4  # vsva.cli.exits.EXIT_CODES


def detach_main(argv: list[str] | None = None) -> int:
    """Run one topology until `vsva down`.

    It holds the state directory's lock (the descriptor `vsva up` passed down) until it exits.
    A SIGTERM while it is still starting unwinds the launch and removes its files. When the
    host is lost it stops, leaves a state file that records when and why (`vsva ps` shows it
    until `vsva down`) and exits with EXIT_HOST_LOST."""
    import argparse

    from vsva.ops.topology_file import TopologyError, default_run, load

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    p = argparse.ArgumentParser(prog="vsva.ops.supervisor")
    p.add_argument("topology", nargs="?")
    p.add_argument("--state-file", required=True)
    p.add_argument("--trace-out")
    args = p.parse_args(argv)
    try:
        run = load(args.topology) if args.topology else default_run()
    except TopologyError as exc:
        print(f"vsva up: {exc}", file=sys.stderr, flush=True)
        return 2
    sup = Supervisor(
        run,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        launcher_kw={"trace_out": args.trace_out},
    )
    try:
        sup.start(state_file=args.state_file)
    except KeyboardInterrupt:
        sup.close()
        return 130
    except Exception as exc:
        print(f"vsva up: launch failed: {exc}", file=sys.stderr, flush=True)
        sup.close()
        return 1
    print(
        f"vsva: supervisor {os.getpid()} running {len(run.topology.actors)} actors in {sup.launcher.run_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        sup.serve()
    finally:
        sup.close()
    if sup.host_lost_info is not None:
        sup.write_state(host_lost=sup.host_lost_info)
        print(f"vsva up: the host was lost: {sup.host_lost_info['why']}", file=sys.stderr, flush=True)
        return EXIT_HOST_LOST
    return 0


if __name__ == "__main__":
    sys.exit(detach_main())
