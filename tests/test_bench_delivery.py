"""Smoke test of the delivery benchmark: `bench/delivery.py --tiny` runs end to end (fakes in their own process),
both initial syncs converge exactly, the fakes counted every upload, and it prints its figures. Benchmarks are
never timed in tests (DESIGN.md), so nothing here asserts a speed or a fill ratio. The fingerprint the convergence
check rests on is checked on its own: it must tell sets apart and ignore order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delivery import BRAZE_MAX, FACEBOOK_MAX, digest  # noqa: E402  (bench/ is not on the default path)


def test_tiny_run_converges_and_prints_its_figures() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "delivery.py"), "--tiny", "--rounds", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    figures = [line for line in lines if line.startswith("delivery figures: ")]
    assert figures and "exact: NO" not in figures[0] and figures[0].count("exact: yes") == 2, done.stdout
    result = json.loads(lines[-1])
    members = result["workload"]["members"]
    for name, maximum in (("braze", BRAZE_MAX), ("facebook", FACEBOOK_MAX)):
        sync = result["sync"][name]
        check = sync["check"]
        assert check["exact"] and check["destination"] == check["expected"], check
        assert check["pending"] == 0 and check["held"] == check["members"] > 0
        assert sync["acknowledged"] == sync["deltas"] == check["members"] and not sync["rejected"]
        fill = sync["fill"]
        assert fill["requests"] > 0 and max(int(size) for size in fill["sizes"]) <= maximum
    braze, facebook = result["sync"]["braze"], result["sync"]["facebook"]
    assert braze["members"] == members and braze["fill"]["items"] == members   # one object per member, sent once
    # Facebook: one row per key a member has (email 90%, phone two thirds), none for members with neither
    keys = facebook["check"]["expected"]
    assert facebook["fill"]["items"] == keys["EMAIL_SHA256"]["count"] + keys["PHONE_SHA256"]["count"]
    assert facebook["members"] < members
    for name in ("braze", "facebook"):
        initial, steady = result["initial_diff"][name], result["steady"][name]
        assert initial["adds"] == result["sync"][name]["deltas"] and initial["removes"] == 0
        changed = result["steady"]["changed_per_round"]
        assert steady["removes"] <= changed and 0 < steady["adds"] <= changed
        assert steady["unchanged_queued"] == 0   # a diff with nothing changed queues nothing


def test_digest_tells_sets_apart_and_ignores_order() -> None:
    assert digest(["a", "b", "c"]) == digest(["c", "a", "b"])
    assert digest(["a", "b"]) != digest(["a", "c"])
    assert digest([])["count"] == 0 and digest(["a"])["count"] == 1
