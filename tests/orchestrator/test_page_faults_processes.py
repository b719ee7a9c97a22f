"""F6 with real processes: `vsva demo --json` pages a buffer in through I/O page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

VSVA = [sys.executable, "-m", "vsva"]


def test_demo_json_shows_page_faults() -> None:
    done = subprocess.run(
        [*VSVA, "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["audit"]["violations"] == []
    # per VM: four demand-paged pages SUCCESS plus the unmapped address answered INVALID
    assert report["flows"]["F6"] == 5 * report["vms"]
    assert report["steps"]["failed"] == []
