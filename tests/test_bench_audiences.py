"""Smoke test of the audiences benchmark: `bench/audiences.py --tiny --rounds 1` runs end to end, finds the
polars path and the DuckDB SQL agreeing on every membership, finds the real-time (touched) evaluation and the
stored memberships equal to a full evaluation, and prints its figures. Benchmarks are never timed in tests
(DESIGN.md), so nothing here asserts a speed. The comparison that guards the benchmark is checked on its own:
it must notice a member only one side has, and an answer that breaks the sorted-unique contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.audiences import AUDIENCES, compare_members, differs  # noqa: E402  (bench/ is not on the default path)


def test_tiny_run_prints_its_figures_and_finds_every_membership_equal() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "audiences.py"), "--tiny", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    figures = [line for line in lines if line.startswith("audiences figures: ")]
    assert figures and "memberships equal: yes" in figures[0], done.stdout
    result = json.loads(lines[-1])
    assert result["equal"]
    assert set(result["checks"]) == {str(a) for a in AUDIENCES} and len(AUDIENCES) == 20
    assert not any(differs(check) for check in result["checks"].values())
    # the data reaches the criteria: most audiences have members even at the tiny size
    assert sum(check["members"] > 0 for check in result["checks"].values()) >= 18
    realtime = result["realtime"]
    assert realtime["check"]["profiles"] > 0
    assert not realtime["check"]["evaluated_differ"] and not realtime["check"]["stored_differ"]
    assert result["apply"]["first"]["adds"] == sum(check["members"] for check in result["checks"].values())


def test_comparison_tells_equal_from_different() -> None:
    def series(values: list[int]) -> pl.Series:
        return pl.Series("mpid", values, dtype=pl.Int64)

    assert not differs(compare_members(series([-5, 1, 7]), series([-5, 1, 7])))
    found = compare_members(series([-5, 1, 7]), series([-5, 7, 9]))
    assert differs(found) and found["only_first"] == 1 and found["only_second"] == 1
    assert found["examples"] == {"only_first": [1], "only_second": [9]}
    assert differs(compare_members(series([1, 1, 7]), series([1, 7])))   # repeated MPIDs break the contract
    assert differs(compare_members(series([7, 1]), series([1, 7])))      # so do unsorted ones
