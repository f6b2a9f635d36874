"""Identity fan-out (audiences/fanout.py): which identities each output sends under which key, normalized and
hashed per spec/outputs.md §2.6, checked against a plain-Python oracle (hashlib, per member) over random
profiles; canonical JSON; reads from a real DuckDB file; stable user-level sampling."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from typing import Any

import polars as pl
import pytest

from audiences import fanout
from audiences.connections import Connection, ConnectionRegistry
from engine.secrets import MasterKey
from engine.store import migrate, open_database

HEX64 = re.compile(r"[0-9a-f]{64}")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def connection(output: str, settings: dict[str, Any] | None = None, credentials: dict[str, str] | None = None
               ) -> Connection:
    base = {"braze": {"base_url": "http://127.0.0.1:1"}, "facebook": {"facebook": {"ad_account_id": "1"}},
            "webhook": {"webhook": {"url": "http://127.0.0.1:1/h"}},
            "kafka": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t"}}}[output]
    merged = {**base, **(settings or {})}
    if output in merged and output in (settings or {}):
        merged[output] = {**base.get(output, {}), **settings[output]}
    secrets = credentials or {"braze": {"api_key": "k"}, "facebook": {"access_token": "t"},
                              "webhook": {"secret": "s"}, "kafka": {}}[output]
    made, _ = ConnectionRegistry(MasterKey(b"k" * 32)).plan_create(
        "ws", 1, {"output": output, "settings": merged, "credentials": secrets})
    return made


def identities(rows: list[tuple[int, str, str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"mpid": pl.Int64, "identity_type": pl.String, "value": pl.String,
                                      "raw_value": pl.String, "added_ms": pl.Int64}, orient="row")


def attributes(rows: list[tuple[int, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"mpid": pl.Int64, "name": pl.String, "value": pl.String}, orient="row")


def built(made: Connection, members: list[int], ids: pl.DataFrame, attrs: pl.DataFrame | None = None
          ) -> dict[int, dict[str, str]]:
    frame = fanout.build_identifiers(made, pl.Series(members, dtype=pl.Int64), ids, attrs)
    assert frame["mpid"].to_list() == sorted(frame["mpid"].to_list())
    answer = {}
    for mpid, text in frame.iter_rows():
        parsed = json.loads(text)
        # canonical: keys sorted, no spaces, so equal identifiers are equal strings
        assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        answer[mpid] = parsed
    return answer


# --- Facebook ------------------------------------------------------------------------------------------------------
def test_facebook_keys_match_the_spec_example():
    made = connection("facebook", {"identity_types": ["email", "mobile_number", "ios_idfa", "customer_id"],
                                   "facebook": {"multi_key": True,
                                                "match_user_attributes": ["FN", "LN", "COUNTRY", "ZIP", "GEN", "CT",
                                                                          "ST"]}})
    ids = identities([(1, "email", "jane.doe@example.com", "Jane.Doe@Example.com ", 1),
                      (1, "mobile_number", "+16505551212", "+1 (650) 555-1212", 1),
                      (1, "ios_idfa", "ab-cd", "AB-CD", 1), (1, "customerid", "user-123", "user-123", 1)])
    attrs = attributes([(1, "$firstname", "Jane"), (1, "$lastname", "Doe"), (1, "$country", "US"),
                        (1, "$zip", "94025-1234"), (1, "$gender", "Female"), (1, "$city", "Menlo Park"),
                        (1, "$state", "CA")])
    assert built(made, [1], ids, attrs) == {1: {
        "EMAIL": "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d",  # the spec's own example
        "PHONE": sha("16505551212"), "MADID": "ab-cd", "EXTERN_ID": "user-123", "FN": sha("jane"),
        "LN": sha("doe"), "COUNTRY": sha("us"), "ZIP": sha("94025"), "GEN": sha("f"), "CT": sha("menlopark"),
        "ST": sha("ca")}}


def facebook_oracle(made: Connection, ids: list[tuple[int, str, str, str, int]],
                    attrs: list[tuple[int, str, str]], members: list[int]) -> dict[int, dict[str, str]]:
    """Per member in plain Python: the first listed type it holds per key, latest added (then smaller value)."""
    answer: dict[int, dict[str, str]] = {}
    order = [(t, key) for t in made.identity_types if (key := facebook_key(t))]
    for mpid in members:
        found: dict[str, str] = {}
        for identity_type, key in order:
            if key in found:
                continue
            candidates = []
            for m, t, _, raw, added in ids:
                if m == mpid and t == identity_type:
                    value = normalize_facebook(key, raw)
                    if value:
                        candidates.append((-added, value))
            if candidates:
                found[key] = min(candidates)[1]
        for name, key in [("$firstname", "FN"), ("$lastname", "LN"), ("$country", "COUNTRY")]:
            if key not in made.options["match_user_attributes"]:
                continue
            values = sorted(v for m, n, raw in attrs if m == mpid and n == name
                            and (v := normalize_attribute(key, raw)))
            if values:
                found[key] = values[0]
        answer[mpid] = {k: (v if k in ("MADID", "EXTERN_ID") or HEX64.fullmatch(v) else sha(v))
                        for k, v in found.items()}
    return {m: found for m, found in answer.items() if found}


def facebook_key(identity_type: str) -> str | None:
    return {"email": "EMAIL", "mobile_number": "PHONE", "phone_number_2": "PHONE", "ios_idfa": "MADID",
            "android_aaid": "MADID", "other": "EXTERN_ID"}.get(identity_type)


def normalize_facebook(key: str, raw: str) -> str:
    trimmed = raw.strip().strip(" \t\r\n\x00\x0b").lower()
    if key == "PHONE":
        return trimmed if HEX64.fullmatch(trimmed) else re.sub(r"\D", "", trimmed).lstrip("0")
    if key == "EXTERN_ID":
        return raw
    return trimmed


def normalize_attribute(key: str, raw: str) -> str | None:
    text = raw.strip(" \t\r\n\x00\x0b.").lower()
    if HEX64.fullmatch(text):
        return text
    letters = "".join(c for c in unicodedata.normalize("NFC", text) if unicodedata.category(c).startswith("L"))
    if key == "COUNTRY":
        return letters if len(letters) == 2 else None
    return letters


ALPHABET = ["a", "B", "é", "1", "0", " ", "+", "-", "(", ".", '"', "\\", "\n", "\x01", "ß", "Ω"]


def random_value(rng: random.Random) -> str:
    if rng.random() < 0.1:
        digest = sha(str(rng.random()))
        return digest.upper() if rng.random() < 0.5 else digest
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))


@pytest.mark.parametrize("seed", range(12))
def test_facebook_matches_the_oracle_over_random_profiles(seed: int):
    rng = random.Random(seed)
    types = rng.sample(["email", "mobile_number", "phone_number_2", "ios_idfa", "android_aaid", "other"],
                       rng.randint(1, 6))
    made = connection("facebook", {"identity_types": types, "facebook": {
        "multi_key": True, "match_user_attributes": rng.sample(["FN", "LN", "COUNTRY"], rng.randint(0, 3))}})
    members = list(range(1, 40))
    id_rows = [(rng.randint(1, 45), rng.choice(types + ["customerid", "ios_idfv"]), "ignored", random_value(rng),
                rng.randint(0, 3)) for _ in range(rng.randint(0, 150))]
    attr_rows = [(rng.randint(1, 45), rng.choice(["$firstname", "$lastname", "$country", "$city"]),
                  random_value(rng)) for _ in range(rng.randint(0, 60))]
    assert built(made, members, identities(id_rows), attributes(attr_rows)) == \
        facebook_oracle(made, id_rows, attr_rows, members)


def test_facebook_preference_order_and_pre_hashed_values():
    made = connection("facebook", {"identity_types": ["phone_number_2", "mobile_number", "email"]})
    hashed = "A" * 64
    ids = identities([(1, "mobile_number", "", "+44 07700", 5), (1, "phone_number_2", "", "0049 30 1234", 1),
                      (2, "mobile_number", "", "555 0100", 1), (2, "mobile_number", "", "555 0199", 9),
                      (3, "email", "", hashed, 1), (4, "email", "", "   ", 1)])
    assert built(made, [1, 2, 3, 4], ids) == {
        1: {"PHONE": sha("49301234")},      # phone_number_2 is listed first; leading zeros go
        2: {"PHONE": sha("5550199")},       # two values of one type: the latest added
        3: {"EMAIL": hashed.lower()},       # already hashed: passed through
    }                                       # 4: a blank email is no identifier


# --- Braze, webhook, Kafka ---------------------------------------------------------------------------------------
def test_braze_external_id_email_and_phone():
    made = connection("braze", {"identity_types": ["customer_id", "email", "mobile_number"]})
    ids = identities([(1, "customerid", "c-1", " C-1", 1), (1, "email", "ann@x.com", " Ann@X.com", 1),
                      (2, "mobile_number", "+447700900123", "+44 7700 900123", 1), (3, "other", "o", "o", 1),
                      (9, "customerid", "c-9", "c-9", 1)])
    assert built(made, [1, 2, 3], ids) == {1: {"external_id": " C-1", "email": "ann@x.com"},
                                           2: {"phone": "+447700900123"}}
    by_email = connection("braze", {"identity_types": ["email"], "braze": {"external_id_type": "email"}})
    assert built(by_email, [1], ids) == {1: {"external_id": " Ann@X.com", "email": "ann@x.com"}}


@pytest.mark.parametrize("output", ["webhook", "kafka"])
def test_webhook_and_kafka_send_the_mpid_and_raw_chosen_identities(output: str):
    made = connection(output, {"identity_types": ["customer_id", "ios_advertising_id"]})
    ids = identities([(1, "customerid", "c", 'C"1\\', 1), (1, "ios_idfa", "x", "X-Y", 1), (1, "email", "e", "e", 1)])
    assert built(made, [1, 2], ids) == {1: {"mpid": "1", "customer_id": 'C"1\\', "ios_advertising_id": "X-Y"},
                                        2: {"mpid": "2"}}
    plain = connection(output)
    assert built(plain, [5, 3], identities([])) == {3: {"mpid": "3"}, 5: {"mpid": "5"}}


def test_identity_type_spellings_and_what_each_output_refuses():
    assert fanout.wire_type("customer_id") == "customerid" == fanout.wire_type("customerid")
    assert fanout.wire_type("ios_advertising_id") == "ios_idfa" == fanout.wire_type("ios_idfa")
    assert fanout.wire_type("android_advertising_id") == "android_aaid" == fanout.wire_type("google_advertising_id")
    assert fanout.wire_type("other_id_2") == "other2" and fanout.wire_type("shoe") is None
    braze_block = {"external_id_type": "customer_id"}
    assert fanout.identity_types_problem("braze", ["customerid", "email", "mobile_number"], braze_block) is None
    assert "ios_idfa" in fanout.identity_types_problem("braze", ["ios_idfa"], braze_block)
    assert fanout.identity_types_problem("facebook", ["email", "other"], {}) is None
    assert "ios_idfv" in fanout.identity_types_problem("facebook", ["ios_idfv"], {})
    assert "EXTERN_ID" in fanout.identity_types_problem("facebook", ["customerid", "other"], {})
    assert fanout.identity_types_problem("webhook", ["push_token"], {}) is None


# --- reading from the database ------------------------------------------------------------------------------------
def test_members_identifiers_reads_the_views_of_its_scope_and_members(tmp_path):
    database = open_database(str(tmp_path / "fanout.duckdb"))
    migrate(database)
    database.execute("""INSERT INTO identities_base VALUES
        ('ws', 1, 'email', 'a@x.com', 'A@x.com', 1), ('ws', 2, 'email', 'b@x.com', 'b@x.com', 1),
        ('ws', 3, 'email', 'c@x.com', 'c@x.com', 1), ('other', 1, 'email', 'z@x.com', 'z@x.com', 1)""")
    database.execute("""INSERT INTO user_attributes_base VALUES
        ('ws', 1, '$firstname', '"Ann"', 1, false), ('ws', 2, '$firstname', '["Bo", "B"]', 1, false),
        ('ws', 3, '$firstname', 'null', 1, false), ('other', 1, '$firstname', '"Zed"', 1, false)""")
    made = connection("facebook", {"identity_types": ["email"],
                                   "facebook": {"multi_key": True, "match_user_attributes": ["FN"]}})
    cursor = database.cursor()
    frame = fanout.members_identifiers(cursor, made, "ws", pl.Series([1, 2, 4], dtype=pl.Int64))
    assert [(m, json.loads(t)) for m, t in frame.iter_rows()] == [
        (1, {"EMAIL": sha("a@x.com"), "FN": sha("ann")}), (2, {"EMAIL": sha("b@x.com"), "FN": sha("bob")})]
    whole = fanout.read_identities(cursor, "ws", ["email"])
    assert sorted(whole["mpid"].to_list()) == [1, 2, 3]
    assert fanout.read_user_attributes(cursor, "ws", ["$firstname"], pl.Series([2])).rows() == [(2, "$firstname",
                                                                                                 "Bo,B")]


# --- sampling -----------------------------------------------------------------------------------------------------
def test_sampling_is_stable_per_connection_and_close_to_its_percent():
    mpids = pl.Series(range(-5_000, 15_000), dtype=pl.Int64)
    buckets = fanout.sample_buckets(7, mpids)
    oracle = [int(sha(f"7:{m}")[:16], 16) % 100 for m in mpids.to_list()[:500]]
    assert buckets.to_list()[:500] == oracle
    assert fanout.sample_buckets(7, mpids.reverse()).to_list() == buckets.reverse().to_list()
    assert fanout.sample_buckets(8, mpids).to_list() != buckets.to_list()  # another connection, another sample
    made = connection("webhook", {"sampling_percent": 30})
    kept = fanout.in_sample(made, mpids)
    assert 0.28 < kept.mean() < 0.32
    assert fanout.in_sample(connection("webhook"), mpids).all()
    assert fanout.in_sample(made, pl.Series([], dtype=pl.Int64)).to_list() == []


def test_many_members_at_once():
    """A hundred thousand members through the columnar path (not timed: that is bench/'s job)."""
    made = connection("facebook", {"identity_types": ["email", "mobile_number"]})
    n = 100_000
    ids = pl.DataFrame({"mpid": list(range(n)) * 2,
                        "identity_type": ["email"] * n + ["mobile_number"] * n,
                        "value": [""] * (2 * n),
                        "raw_value": [f"User{i}@Example.com" for i in range(n)] + [f"+1 555 {i:07d}" for i in range(n)],
                        "added_ms": [0] * (2 * n)})
    frame = fanout.build_identifiers(made, pl.Series(range(n)), ids)
    assert frame.height == n
    assert json.loads(frame.row(n - 1)[1]) == {"EMAIL": sha(f"user{n - 1}@example.com"),
                                               "PHONE": sha(f"1555{n - 1:07d}")}
