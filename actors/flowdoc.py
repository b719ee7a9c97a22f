"""docs/flows.md, generated from the message catalogue (vsva.actors.catalogue).

    python -m vsva.actors.flowdoc --write docs/flows.md    # regenerate
    python -m vsva.actors.flowdoc --check docs/flows.md    # exit 1 when it is stale

tests/actors/test_catalogue.py fails when the committed file differs from `render()`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vsva.actors.catalogue import CATALOGUE, FLOWS, INVARIANTS, Message, Schema

HEADER = """# Flows and messages

Generated from `actors/catalogue.py` by `python -m vsva.actors.flowdoc --write docs/flows.md`;
do not edit by hand (tests/actors/test_catalogue.py fails when this file is stale).

Every message travels in the envelope of `actors/messages.py` as a msgpack map. A field named
`hpasid` is a host PASID, `gpasid` a guest PASID. A request's body is checked against its
fields before any handler runs (-EINVAL; an unknown kind -EOPNOTSUPP); a successful reply
(`ret` 0) must carry its reply fields, or the requester sees -EBADMSG.

Invariants the audit checks (orchestrator/analysis/audit.py):
"""


def _fields(schema: type[Schema]) -> list[str]:
    if not schema.FIELDS:
        return ["  (no fields)"]
    return [f"  - `{s.name}`: {s.describe()}" + (f" — {s.doc}" if s.doc else "") for s in schema.FIELDS]


def _message(cls: type[Message]) -> list[str]:
    what = "event, one-way" if cls.REPLY is None else "request"
    out = [
        f"### `{cls.KIND}` ({cls.__name__}, {what})",
        "",
        f"{cls.HOP} · kernel: `{cls.KERNEL}`",
        "",
        (cls.__doc__ or "").strip().splitlines()[0],
        "",
        "- body:",
        *_fields(cls),
    ]
    if cls.REPLY is not None:
        out += ["- reply on success:", *_fields(cls.REPLY)]
    return out + [""]


def render() -> str:
    """The whole document: per flow its summary, invariants, hops and messages."""
    lines, shown = [HEADER, *[f"- {name} {what}" for name, what in INVARIANTS.items()], ""], set()
    for flow in FLOWS.values():
        members = [
            c for c in CATALOGUE.values() if flow.name in c.FLOWS and c.__module__ == Message.__module__
        ]
        lines += [
            f"## {flow.name}: {flow.title}",
            "",
            flow.summary,
            "",
            f"Invariants: {', '.join(flow.invariants) or '—'}",
            "",
            "| hop | message | kernel |",
            "|---|---|---|",
            *[f"| {c.HOP} | `{c.KIND}` | `{c.KERNEL}` |" for c in members],
            "",
        ]
        for cls in members:  # described once, under the first flow that uses it
            lines += _message(cls) if cls.KIND not in shown else []
            shown.add(cls.KIND)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the document here")
    group.add_argument("--check", type=Path, help="exit 1 when this file differs from the catalogue")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        return 0
    current = args.check.read_text() if args.check.exists() else ""
    if current != text:
        print(
            f"{args.check} is stale: run python -m vsva.actors.flowdoc --write {args.check}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
