"""Schemathesis against the running server's own OpenAPI document (DESIGN: "fuzzing the OpenAPI spec finds no 5xx").

A real uvicorn on a loopback port over a real DuckDB file serves /openapi.json; schemathesis reads it and sends
every operation generated requests, valid and invalid (its coverage phase, then a few random ones), authenticated
as a real caller would be: the admin bearer token on the platform routes, a workspace's Basic credentials on the
others, the key alone on the web SDK's key-in-path routes. Path parameters, MPIDs in bodies and the profile
`fields` are sometimes a seeded workspace, profile or key, so requests also reach real data instead of stopping
at "not found". Every answer must be below 500, and match the document where it describes the answer.

Deterministic: a fixed seed, derandomized generation, no example database, no response-driven feedback. Below
the fuzzing, regression tests for the 5xx answers it and the parser fuzzers (test_fuzz_parsers.py) found.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer, WorkspaceCredentials
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_EXAMPLES = 5  # random cases per operation, after the coverage phase's boundary and type-violating cases

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20260807,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
    "phases": {
        "examples": {"enabled": False},  # the document has no examples
        # one method an operation lacks is enough to see a 405; the default tries seven per operation
        "coverage": {"enabled": True, "extra-data-sources": {"responses": False}, "unexpected-methods": ["PATCH"]},
        "fuzzing": {"enabled": True, "extra-data-sources": {"responses": False}, "error-feedback": {"enabled": False}},
        "stateful": {"enabled": False},
    },
})
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
MPID_KEYS = ("mpid", "previous_mpid", "source_mpid", "destination_mpid")
PROFILE_FIELDS = ["user_identities", "device_identities,user_identities,user_attributes,audience_memberships,attribution"]


@dataclass(frozen=True)
class Seeded:
    """What the fuzzer may use besides its own values."""

    workspace: WorkspaceCredentials
    other: WorkspaceCredentials  # a second workspace: the first's credentials must get 403 there
    mpids: tuple[str, ...]
    calculated_attribute: str
    audience: str
    connection: str  # a webhook connection of the audience

    def path_values(self, method: str) -> dict[str, list[str]]:
        # PUT on the caller's own workspace would let generated settings (a rate limit, key-only auth off) steer
        # the rest of the run, and a DELETE would take the seeded attribute from the operations after it.
        workspaces = [self.other.id] if method == "PUT" else [self.workspace.id, self.other.id]
        return {"workspace_id": workspaces, "mpid": list(self.mpids), "api_key": [self.workspace.api_key],
                "ca_id": [] if method == "DELETE" else [self.calculated_attribute],
                "audience_id": [] if method == "DELETE" else [self.audience],
                "connection_id": [] if method == "DELETE" else [self.connection]}


def _seed(server: LiveServer) -> Seeded:
    workspace = server.create_workspace({"key_only_auth": True}, name="fuzzed")
    other = server.create_workspace(name="other")
    client = IdSyncClient(server, workspace)
    try:
        mpids = tuple(client.identify({"customerid": f"c{n}", "email": f"p{n}@example.com"})["mpid"]
                      for n in range(3))
        for n, mpid in enumerate(mpids):
            batch = {"mpid": mpid, "environment": "production", "user_attributes": {"tier": f"t{n}"},
                     "events": [{"event_type": "custom_event",
                                 "data": {"event_name": "seeded", "timestamp_unixtime_ms": 1_700_000_000_000 + n}}]}
            response = client.http.post("/v2/events", json=batch, auth=client.auth)
            assert response.status_code == 202, response.text
        assert client.alias(mpids[0], mpids[1]).status_code == 202
        definition = {"calculation_type": "count", "data_point": {"event_type": "custom_event"}}
        created = client.http.post(f"/platform/v2/workspaces/{workspace.id}/calculatedattributes", auth=client.auth,
                                   json={"name": "seeded events", "draft_definition": definition})
        assert created.status_code == 201, created.text
        audience = client.http.post(f"/platform/v2/workspaces/{workspace.id}/audiences", auth=client.auth, json={
            "name": "seeded players", "criteria": {"event": {"event_type": "custom_event", "event_name": "seeded"}}})
        assert audience.status_code == 201, audience.text
        connection = client.http.post(
            f"/platform/v2/workspaces/{workspace.id}/audiences/{audience.json()['id']}/connections", auth=client.auth,
            json={"output": "webhook", "credentials": {"secret": "s"}, "settings": {"webhook": {"url": "http://127.0.0.1:9/"}}})
        assert connection.status_code == 201, connection.text
    finally:
        client.close()
    return Seeded(workspace, other, mpids, str(created.json()["id"]), str(audience.json()["id"]),
                  str(connection.json()["id"]))


@pytest.fixture(scope="module")
def seeded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Seeded]]:
    server = LiveServer(Path(tmp_path_factory.mktemp("fuzz")) / "idmesh.duckdb").start()
    try:
        yield server, _seed(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(seeded_server: tuple[LiveServer, Seeded]) -> LiveServer:
    return seeded_server[0]


@pytest.fixture(scope="module")
def seeded(seeded_server: tuple[LiveServer, Seeded]) -> Seeded:
    return seeded_server[1]


def _with_mpids(body: Any, source: str, destination: str) -> Any:
    """`body` with every MPID-named member set to a seeded profile (the destination one for destination_mpid)."""
    body = copy.deepcopy(body)
    stack = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in MPID_KEYS:
                if key in node:
                    node[key] = destination if key == "destination_mpid" else source
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return body


def _register_hooks(schema: schemathesis.BaseSchema, data: Seeded) -> None:
    @schema.hook
    def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any]
                                ) -> st.SearchStrategy:
        real = data.path_values(context.operation.method.upper())
        return st.fixed_dictionaries({name: st.sampled_from([value, *real.get(name, [])])
                                      for name, value in (path_parameters or {}).items()})

    @schema.hook
    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
        pairs = st.permutations(data.mpids).map(lambda mpids: _with_mpids(body, mpids[0], mpids[1]))
        return st.just(body) | pairs

    @schema.hook
    def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
        # The coverage phase takes no flatmap hooks, only this one: its cases get the seeded path values (so the
        # body it varies reaches real data), except those that vary a path parameter themselves.
        phase = case.meta.phase if case.meta is not None else None
        if phase is None or phase.name != "coverage" or getattr(phase.data, "parameter_location", None) == "path":
            return case
        real = data.path_values(context.operation.method.upper())
        case.path_parameters = {name: (real.get(name) or [value])[0] for name, value in (case.path_parameters or {}).items()}
        return case

    @schema.hook
    def flatmap_query(context: schemathesis.HookContext, query: dict[str, Any] | None) -> st.SearchStrategy:
        if not context.operation.path.startswith("/userprofile/"):
            return st.just(query)
        return st.just(query) | st.sampled_from(PROFILE_FIELDS).map(lambda fields: {**(query or {}), "fields": fields})


@pytest.fixture(scope="module")
def api_schema(seeded_server: tuple[LiveServer, Seeded]) -> schemathesis.BaseSchema:
    server, data = seeded_server
    loaded = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=CONFIG)
    _register_hooks(loaded, data)
    return loaded


def _auth_headers(case: schemathesis.Case, data: Seeded) -> dict[str, str]:
    if "{api_key}" in case.operation.path:
        return {}  # the key in the path is the credential (the workspace allows key-only auth)
    if case.operation.path.startswith("/platform/"):
        return ADMIN
    basic = base64.b64encode(f"{data.workspace.api_key}:{data.workspace.api_secret}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schemas rename the test node per operation through `node._nodeid`, an attribute
    # pytest 9.2 no longer has (it keeps `_id`); giving the node one makes the renaming a harmless no-op.
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
# 50 cases per operation (hypothesis default 100) keeps the whole suite near 10 minutes on two cores
@hypothesis.settings(max_examples=50, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_answers_below_500_and_as_documented(case: schemathesis.Case, seeded: Seeded) -> None:
    case.call_and_validate(headers=_auth_headers(case, seeded), checks=CHECKS, timeout=30)


def test_every_post_and_put_documents_the_body_it_reads(server: LiveServer) -> None:
    """Routes read their bodies themselves (api/body.py), so FastAPI cannot infer them: without
    `openapi_extra=body_schema(Model)` the document shows no body and fuzzers never send one."""
    bodiless = {("POST", "/platform/v2/workspaces/{workspace_id}/calculatedattributes/{ca_id}/activation"),  # read none
                ("POST", "/platform/v2/workspaces/{workspace_id}/audiences/{audience_id}/calculation"),
                ("POST", "/platform/v2/workspaces/{workspace_id}/audiences/{audience_id}/connections/"
                         "{connection_id}/resync")}
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    missing = [(method.upper(), path) for path, operations in document["paths"].items()
               for method, operation in operations.items()
               if method in ("post", "put") and "requestBody" not in operation and (method.upper(), path) not in bodiless]
    assert missing == []


# --- regressions: each of these answered 5xx (or broke later reads) before its fix --------------------------------

@pytest.fixture
def workspace(server: LiveServer) -> WorkspaceCredentials:
    return server.create_workspace({"strategy": "profile_conversion"})


@pytest.fixture
def client(server: LiveServer, workspace: WorkspaceCredentials) -> Iterator[IdSyncClient]:
    client = IdSyncClient(server, workspace)
    yield client
    client.close()


BIGGEST = (1 << 64) - 1  # the largest integer orjson reads as an integer


@pytest.mark.parametrize("batch, field", [
    ({"timestamp_unixtime_ms": 1e300}, "timestamp_unixtime_ms"),
    ({"timestamp_unixtime_ms": BIGGEST}, "timestamp_unixtime_ms"),
    ({"events": [{"event_type": "session_start", "data": {"timestamp_unixtime_ms": 1 << 63}}]},
     "events[0].data.timestamp_unixtime_ms"),
    ({"events": [{"event_type": "screen_view", "data": {"screen_name": "s", "timestamp_unixtime_ms": 1e20}}]},
     "events[0].data.timestamp_unixtime_ms"),
    ({"events": [{"event_type": "user_attribute_change",
                  "data": {"user_attribute_name": "a", "new": 1, "timestamp_unixtime_ms": 1e20}}]},
     "events[0].data.timestamp_unixtime_ms"),
    ({"consent_state": {"gdpr": {"p": {"consented": True, "timestamp_unixtime_ms": 1e20}}}},
     "consent_state.gdpr.p.timestamp_unixtime_ms"),
])
def test_a_timestamp_beyond_the_store_is_a_400_and_the_profile_stays_readable(
        client: IdSyncClient, workspace: WorkspaceCredentials, batch: dict[str, Any], field: str) -> None:
    """Before: 503 (the group commit failed, failing every request sharing it) or 202 followed by 500 on every read
    of the profile, its events or its consent (the views cast the stored value to BIGINT)."""
    mpid = client.identify({"customerid": "stamp"})["mpid"]
    response = client.http.post("/v2/events", json={"mpid": mpid, **batch}, auth=client.auth)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
    profile = client.http.get(f"/userprofile/v1/1/1/{workspace.id}/{mpid}", auth=client.auth,
                              params={"fields": "user_attributes"})
    assert profile.status_code == 200, profile.text


def test_an_alias_window_beyond_the_store_is_a_400(client: IdSyncClient) -> None:
    """Before: 503, the alias row could not be committed (BIGINT overflow)."""
    source, destination = (client.identify({"customerid": f"w{n}"})["mpid"] for n in range(2))
    response = client.alias(source, destination, end_unixtime_ms=1 << 63)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == "data.end_unixtime_ms"


def test_a_signature_header_with_non_ascii_characters_is_a_401(server: LiveServer,
                                                               workspace: WorkspaceCredentials) -> None:
    """Before: 500 (hmac.compare_digest refuses str holding non-ASCII characters)."""
    response = httpx.post(f"{server.base_url}/v1/identify", content=b"{}",
                          headers={"x-mp-key": workspace.api_key, "x-mp-signature": "\u00e9t\u00e9".encode("latin-1")})
    assert response.status_code == 401, response.text


@pytest.mark.parametrize("settings, field", [
    ({"normalization": {"email": [{}]}}, "settings.normalization.email"),
    ({"blocked_patterns": ["a{99999999999}"]}, "settings.blocked_patterns"),
    ({"rate_limit": {"requests_per_second": 1, "burst": 1e300}}, "settings.rate_limit.burst"),
    ({"alias": {"delay_seconds": BIGGEST}}, "settings.alias.delay_seconds"),
    ({"alias": {"max_window_days": BIGGEST}}, "settings.alias.max_window_days"),
])
def test_settings_beyond_what_the_store_holds_are_a_400(server: LiveServer, settings: dict[str, Any], field: str) -> None:
    """Before: 500 at once (unhashable step, regex repeat overflow), 500 on every later workspace listing (a burst
    orjson cannot write), or 503 on every alias of the workspace (times past 64 bits)."""
    with server.client() as http:
        response = http.post("/platform/v2/workspaces", json={"name": "bounds", "settings": settings}, headers=ADMIN)
        listed = http.get("/platform/v2/workspaces", headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
    assert listed.status_code == 200


def test_a_tiny_rate_limit_answers_429_with_a_finite_retry_after(server: LiveServer) -> None:
    """Before: 500 (the wait overflowed to infinity, and math.ceil(inf) raises)."""
    throttled = IdSyncClient(server, server.create_workspace({"rate_limit": {"requests_per_second": 5e-324, "burst": 1}}))
    try:
        throttled.identify({"customerid": "first"})
        response = throttled.raw("identify", {"customerid": "second"})
    finally:
        throttled.close()
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) < 1 << 31


@pytest.mark.parametrize("definition, field", [
    ({"calculation_type": [], "data_point": {"event_type": "custom_event"}}, "draft_definition.calculation_type"),
    ({"calculation_type": "count", "data_point": {"event_type": "custom_event"},
      "conditions": [{"attribute_name": "a", "operator": {}}]}, "draft_definition.conditions[0].operator"),
    ({"calculation_type": "count", "data_point": {"event_type": "custom_event"},
      "conditions": [{"attribute_name": "a", "operator": "equals", "value_type": {"a": 1}, "values": ["x"]}]},
     "draft_definition.conditions[0].operator"),
])
def test_a_calculated_attribute_naming_no_known_type_is_a_400(client: IdSyncClient, workspace: WorkspaceCredentials,
                                                              definition: dict[str, Any], field: str) -> None:
    """Before: 500 (a list or object is unhashable, and the type was looked up in a set)."""
    response = client.http.post(f"/platform/v2/workspaces/{workspace.id}/calculatedattributes", auth=client.auth,
                                json={"name": "unhashable", "draft_definition": definition})
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field


@pytest.mark.parametrize("seed, field", [({"count": 1 << 63}, "seeds[0].count"),
                                         ({"as_of": BIGGEST}, "seeds[0].as_of")])
def test_a_seed_beyond_the_store_is_a_400(client: IdSyncClient, workspace: WorkspaceCredentials,
                                          seed: dict[str, Any], field: str) -> None:
    """Before: 503, the seeds row could not be committed (BIGINT), failing the requests sharing its commit."""
    mpid = client.identify({"customerid": "seeded"})["mpid"]
    base = f"/platform/v2/workspaces/{workspace.id}/calculatedattributes"
    created = client.http.post(base, auth=client.auth, json={"name": "spend", "draft_definition": {
        "calculation_type": "sum", "data_point": {"event_type": "custom_event", "attribute_name": "amount"}}})
    response = client.http.post(f"{base}/{created.json()['id']}/seeds", auth=client.auth,
                                json={"seeds": [{"mpid": mpid, "value": 5, "as_of": 1_700_000_000_000, **seed}]})
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
