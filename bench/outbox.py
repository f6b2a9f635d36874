"""Membership diff of one connection at 1M members (DESIGN.md goal: <= 1 s), on a real DuckDB file.

    .venv/bin/python bench/outbox.py            # 1,000,000 members
    .venv/bin/python bench/outbox.py --quick    # 100,000

A webhook connection sending email and customer id; every member has both, 1% opted out of CCPA sale. Timed per
phase of one diff as the delivery service runs it: current members, consent and sampling, fan-out (identifiers as
canonical JSON), the outbox diff itself (state and pending rows vs wanted, rows written) and the commit. Scenarios:
the initial sync (every member an add), a steady diff with nothing changed, and one with 1% of members leaving and
1% arriving; medians of --rounds rounds. The figure the goal speaks of is the outbox diff (the fan-out is timed
apart: it is the identifiers' cost, the same for any diff strategy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/outbox.py`
    sys.path.insert(0, str(ROOT))


from audiences import fanout, outbox  # noqa: E402
from audiences.connections import Connection, Credentials, check_settings  # noqa: E402
from audiences.membership import current_members  # noqa: E402
from engine.store import open_database  # noqa: E402

WS, AUDIENCE = "ws_bench", 1


def seed(cursor, first: int, count: int) -> None:
    last = first + count
    cursor.execute(f"INSERT INTO identities_base SELECT '{WS}', i, 'email', 'u' || i || '@example.com', "
                   f"'U' || i || '@Example.com', 0 FROM range({first}, {last}) r(i)")
    cursor.execute(f"INSERT INTO identities_base SELECT '{WS}', i, 'customerid', 'c' || i, 'C' || i, 0 "
                   f"FROM range({first}, {last}) r(i)")
    cursor.execute(f"INSERT INTO audience_membership_history SELECT '{WS}', {AUDIENCE}, i, 0, NULL "
                   f"FROM range({first}, {last}) r(i)")
    cursor.execute(f"INSERT INTO consent_history_base SELECT '{WS}', i, 'ccpa', 'data_sale_opt_out', true, NULL, 0, "
                   f"NULL, NULL, 0, 'b' FROM range({first}, {last}, 100) r(i)")


def one_diff(cursor, connection: Connection, at_ms: int) -> dict[str, float]:
    marks = [time.perf_counter()]
    members = current_members(cursor, WS, AUDIENCE)
    marks.append(time.perf_counter())
    kept = outbox.consented_members(cursor, connection, members)
    marks.append(time.perf_counter())
    wanted = fanout.members_identifiers(cursor, connection, WS, kept)
    marks.append(time.perf_counter())
    cursor.begin()
    result = outbox.diff_connection(cursor, connection, wanted, at_ms)
    marks.append(time.perf_counter())
    cursor.commit()
    marks.append(time.perf_counter())
    names = ("members", "consent", "fanout", "diff", "commit")
    timings = {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}
    timings.update(adds=result.adds, removes=result.removes, wanted=result.wanted)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 members")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = 100_000 if args.quick else 1_000_000
    settings = check_settings("webhook", {"webhook": {"url": "http://127.0.0.1:9/hook"},
                                          "identity_types": ["email", "customer_id"]})
    connection = Connection(1, WS, AUDIENCE, "webhook", "bench", "active", settings, Credentials({"secret": "s"}))
    rounds: dict[str, list[dict[str, float]]] = {"initial": [], "steady": [], "churn_1pct": []}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as scratch:
        for round_number in range(args.rounds):
            db = open_database(str(Path(scratch) / f"outbox-{round_number}.duckdb"))
            cursor = db.cursor()
            seed(cursor, 1, size)
            clock = 1_000_000
            rounds["initial"].append(one_diff(cursor, connection, clock))
            # everything acknowledged, in bulk (as acknowledgements leave it)
            cursor.execute("INSERT INTO delivery_state (workspace_id, connection_id, mpid, identifiers, acknowledged_ms) "
                           "SELECT workspace_id, connection_id, mpid, identifiers, 0 "
                           "FROM delivery_outbox WHERE op = 'add'")
            cursor.execute("DELETE FROM delivery_outbox")
            cursor.execute("CHECKPOINT")
            rounds["steady"].append(one_diff(cursor, connection, clock + 1))
            churn = size // 100
            cursor.execute("UPDATE audience_membership_history SET exited_ms = 5 WHERE mpid % 100 = 7")
            seed(cursor, size + 1, churn)
            rounds["churn_1pct"].append(one_diff(cursor, connection, clock + 2))
            cursor.close()
            db.close()
    summary = {scenario: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for scenario, runs in rounds.items()}
    for scenario, figures in summary.items():
        print(f"{scenario:>11}: diff {figures['diff']:.3f} s (+{figures['adds']:.0f} -{figures['removes']:.0f} of "
              f"{figures['wanted']:.0f} wanted) | members {figures['members']:.3f} consent {figures['consent']:.3f} "
              f"fan-out {figures['fanout']:.3f} commit {figures['commit']:.3f}")
    out = ROOT / "bench" / "results" / f"outbox-{size}-{time.strftime('%Y%m%d-%H%M%S')}.result.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"members": size, "rounds": rounds, "median": summary}, indent=2))
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
