"""Habits of the repository that a test can keep: comments and docstrings cite documents that
exist (CONTRIBUTING.md, "Habits"), by a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITE = re.compile(r"docs/([\w-]+\.md)((?: ?§\d+,?)*)")


def _sources() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.pyx", "*.pxi", "*.pxd", "*.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in listed]


def _sections(doc: Path) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^## (\d+)\.", doc.read_text(), re.M)}


def test_cited_documents_and_sections_exist():
    bad = []
    for path in _sources():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITE.finditer(line):
                doc = ROOT / "docs" / m.group(1)
                if not doc.exists():
                    bad.append(f"{path.relative_to(ROOT)}:{n}: no docs/{m.group(1)}")
                    continue
                for section in re.findall(r"§(\d+)", m.group(2)):
                    if section not in _sections(doc):
                        bad.append(f"{path.relative_to(ROOT)}:{n}: docs/{m.group(1)} has no §{section}")
    assert bad == []


def test_no_citation_of_documents_outside_the_repository():
    outside = re.compile(r"\bSPEC\s§|kernel-semantics\.md|shared/(research|seed)/")
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources()
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert found == []
