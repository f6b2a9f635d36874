"""Smoke test of the event ingest benchmark: `bench/ingest.py --quick` runs end to end and prints its figures.
Benchmarks are never timed in tests (DESIGN.md), so nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_its_figures_and_stores_every_event() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("ingest figures: ") for line in lines), done.stdout
    result = json.loads(lines[-1])
    assert result["summary"]["events_per_s"] > 0
    assert result["verification"]["idmesh"]["ok"], result["verification"]
