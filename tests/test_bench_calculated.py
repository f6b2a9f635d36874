"""Smoke test of the calculated attributes benchmark: `bench/calculated.py --tiny --rounds 1` runs end to end,
finds the polars path and the DuckDB SQL equal, and prints its figures. Benchmarks are never timed in tests
(DESIGN.md), so nothing here asserts a speed. The comparison that guards the benchmark is checked on its own:
it must notice a changed value, a missing profile and a float off by more than rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.calculated import compare_values  # noqa: E402  (bench/ is not a package on the default path)


def test_tiny_run_prints_its_figures_and_finds_both_sides_equal() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "calculated.py"), "--tiny", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    figures = [line for line in lines if line.startswith("calculated figures: ")]
    assert figures and "values equal: yes" in figures[0], done.stdout
    result = json.loads(lines[-1])
    assert result["equal"] and not result["incremental"]["check"]["differ"]
    assert set(result["checks"]) == set(result["definitions"]) and len(result["definitions"]) == 10
    assert all(check["profiles"] > 0 for check in result["checks"].values())


def frame(values: list[object], dtype: pl.DataType) -> pl.DataFrame:
    return pl.DataFrame({"mpid": list(range(len(values))), "value": values},
                        schema={"mpid": pl.Int64, "value": dtype})


def test_comparison_tells_equal_from_different() -> None:
    assert compare_values(frame([1.0, 2.5], pl.Float64), frame([1.0, 2.5 + 1e-12], pl.Float64))["differ"] == 0
    assert compare_values(frame([1.0, 2.5], pl.Float64), frame([1.0, 2.51], pl.Float64))["differ"] == 1
    assert compare_values(frame(["a", "b"], pl.String), frame(["a", "c"], pl.String))["differ"] == 1
    assert compare_values(frame(["a", "b"], pl.String), frame(["a"], pl.String))["differ"] == 1
    lists = pl.List(pl.String)
    assert compare_values(frame([["x", "y"]], lists), frame([["x", "y"]], lists))["differ"] == 0
    assert compare_values(frame([["x", "y"]], lists), frame([["y", "x"]], lists))["differ"] == 1
