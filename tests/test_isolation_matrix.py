"""The isolation matrix (DESIGN, reliability and security goals): every route of the app refuses missing, malformed
and wrong credentials without changing anything, and one workspace's credentials can never read or change another
workspace's data, through any route, analyst SQL included. Real HTTP into a real DuckDB file.

ROUTES has one entry per method and path: who may call it, a valid request on a workspace's own data, and the ways
that route could reach another workspace's data. The routes are listed from the app itself, so a route added without
an entry fails test_the_matrix_covers_every_route_of_the_app instead of shipping unchecked.

Two workspaces: the victim (key-only auth off), whose data every refused or cross-workspace request aims at, and the
attacker (key-only auth on, so its public key alone is a credential where the web SDK needs one). Every string the
victim's data holds is unique to it, so an answer leaks it only if the string shows up in the answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from enum import Enum
from typing import Any
from urllib.parse import urlencode

import httpx
import pyarrow.parquet as pq
import pytest
from audience_seed import apply_audience, seed_audience
from delivery_seed import seed_delivery
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from live_server import ADMIN_TOKEN, LiveServer, WorkspaceCredentials

from api.ca_routes import background_idle
from engine.analyst_sql import PUBLIC_VIEWS
from engine.profiles import PROFILE_FIELDS


class Auth(Enum):
    PUBLIC = "public"                    # no credentials; the answer says nothing about any workspace
    ADMIN = "admin"                      # the admin bearer token only
    SECRET = "workspace-secret"          # the workspace's key + secret (Basic or HMAC)
    KEY_ONLY_ALLOWED = "workspace-key-only-allowed"  # also the key alone, when the workspace sets key_only_auth


@dataclass(frozen=True)
class Call:
    path: str
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def content(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()

    def sent(self) -> str:
        """Everything the caller sent: an answer may echo it without leaking anything."""
        return f"{self.path}?{urlencode(self.params)}\n{self.content().decode()}"


@dataclass
class Tenant:
    credentials: WorkspaceCredentials
    label: str
    http: httpx.Client
    customer_id: str = ""
    email: str = ""
    other: str = ""
    device: str = ""
    known: int = 0                        # a logged-in profile
    anon: int = 0                         # an anonymous profile, aliased into `known`
    alias_id: str = ""
    batch_id: str = ""
    request_id: str = ""
    spare_pair: tuple[int, int] = (0, 0)  # two profiles that could still be aliased
    hub_customers: list[str] = field(default_factory=list)
    dsr_pending: str = ""                 # data subject requests: one waiting, one in a group, one completed access
    dsr_spare: str = ""
    dsr_done: str = ""
    dsr_group: str = ""
    event_name: str = ""
    ca_id: int = 0                        # an active calculated attribute counting the workspace's event
    ca_name: str = ""
    audience_id: int = 0                  # an audience holding `known`, which `anon` has left
    audience_name: str = ""
    managed_audience: int = 0             # a real-time audience created through the Platform API, its registry
    managed_audience_name: str = ""
    connection_id: int = 0                # a connection of the managed audience (a webhook), its name and secret
    connection_name: str = ""
    connection_secret: str = ""
    mpids: set[int] = field(default_factory=set)
    values: set[str] = field(default_factory=set)  # strings only this workspace's data and settings hold
    writes: int = 0                       # requests this test made with the workspace's own credentials

    @property
    def id(self) -> str:
        return self.credentials.id

    @property
    def key(self) -> str:
        return self.credentials.api_key

    @property
    def secret(self) -> str:
        return self.credentials.api_secret

    def call(self, path: str, body: Any) -> dict[str, Any]:
        self.writes += 1
        response = self.http.post(path, json=body, headers=basic(self.key, self.secret))
        assert response.status_code < 300, response.text
        return response.json() if response.content else {}

    def new_profile(self, identities: dict[str, str], operation: str = "identify") -> int:
        answer = self.call(f"/v1/{operation}", {"environment": "production", "known_identities": identities})
        self.mpids.add(int(answer["mpid"]))
        return int(answer["mpid"])

    def fresh_pair(self) -> tuple[int, int]:
        return (self.new_profile({"ios_idfv": unique(f"{self.label}-device")}),
                self.new_profile({"ios_idfv": unique(f"{self.label}-device")}))

    def fresh_alias(self) -> str:
        return self.call("/v1/alias", alias_body(*self.fresh_pair()))["alias_id"]

    def ca_path(self, suffix: str = "") -> str:
        return f"/platform/v2/workspaces/{self.id}/calculatedattributes{suffix}"

    def new_attribute(self, definition: dict[str, Any] | None = None, name: str | None = None) -> int:
        body = {"name": name or unique(f"{self.label}-ca"), "draft_definition": definition or count_of("isolation")}
        return self.call(self.ca_path(), body)["id"]

    def drafted(self) -> int:
        """The active attribute, given a draft to discard."""
        self.writes += 1
        self.http.put(self.ca_path(f"/{self.ca_id}"), json={"draft_definition": count_of("isolation")},
                      headers=basic(self.key, self.secret)).raise_for_status()
        return self.ca_id

    def audience_path(self, suffix: str = "") -> str:
        return f"/platform/v2/workspaces/{self.id}/audiences{suffix}"

    def new_audience(self) -> int:
        body = {"name": unique(f"{self.label}-audience"), "criteria": {"identity": {"type": "customerid"}}}
        return self.call(self.audience_path(), body)["id"]

    def connection_path(self, suffix: str = "", audience_id: int | None = None) -> str:
        return self.audience_path(f"/{audience_id or self.managed_audience}/connections{suffix}")

    def connection_body(self, name: str | None = None, secret: str | None = None) -> dict[str, Any]:
        # inactive: the delivery service would otherwise write attempts in the background, a change no request made
        return {"output": "webhook", "name": name or unique(f"{self.label}-connection"), "status": "inactive",
                "credentials": {"secret": secret or unique(f"{self.label}-webhook-secret")},
                "settings": {"webhook": {"url": "http://127.0.0.1:9/hook"}, "identity_types": ["email"]}}

    def new_connection(self) -> int:
        return self.call(self.connection_path(), self.connection_body())["id"]

    def submit_dsr(self, request_type: str = "access", skip_waiting_period: bool = False, **fields: Any) -> str:
        identities = {"controller_customer_id": self.customer_id}
        return self.call("/v3/requests", dsr_body(request_type, identities, skip_waiting_period, **fields))[
            "subject_request_id"]


@dataclass
class World:
    server: LiveServer
    http: httpx.Client
    victim: Tenant
    attacker: Tenant
    database: str
    routes: set[str]                      # what the app serves, as "METHOD /path"
    relations: dict[str, str | None]      # what state() compares
    # the victim's strings the attacker sent in a write that succeeded: its own workspace may hold them now (a
    # login with the victim's email gives the attacker a profile with that email), so seeing them proves nothing
    planted: set[str] = field(default_factory=set)
    # the last state() of every relation, with the group-commit writer's commit count then: while that count stands
    # (and background calculations are settled) nothing was written, so the next route starts from it
    clean_state: tuple[int, dict[str, tuple[int, int]]] | None = None
    # the victim's state after the last route's attacks, with the victim's own write count then: only the victim's
    # own requests may change it, so while that count stands the next route starts from it
    victim_seen: tuple[int, dict[str, Any]] | None = None


HeaderMap = dict[str, str | bytes]
Headers = Callable[[World, str, Call], HeaderMap]


@dataclass(frozen=True)
class Attack:
    what: str
    call: Call
    expect: frozenset[int]
    check: Callable[[httpx.Response], None] | None = None
    once: bool = False  # its request leaves something in the attacker's workspace that changes the meaning of a repeat


@dataclass(frozen=True)
class RouteCase:
    auth: Auth
    request: Callable[[Tenant], Call]  # a valid request on that workspace's own data
    ok: int                            # the status of that request with valid credentials
    admin_too: bool = False            # the admin token may also call it, for any workspace
    attacks: Callable[[World], list[Attack]] = lambda world: []  # the attacker's ways at the victim's data


def unique(label: str) -> str:
    return f"{label}-{secrets.token_hex(6)}"


def now_ms() -> int:
    return int(time.time() * 1000)


def basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


def signed(key: str, secret: str, method: str, call: Call, signed_date: str | None = None) -> HeaderMap:
    """mParticle's HMAC: hex(HMAC_SHA256(secret, METHOD\\nDATE\\nPATH+BODY)). `signed_date` signs another Date than
    the one sent."""
    date = formatdate(usegmt=True)
    message = f"{method}\n{signed_date or date}\n{call.path}{call.content().decode()}".encode()
    signature = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return {"x-mp-key": key, "Date": date, "x-mp-signature": signature}


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def alias_body(source: int, destination: int) -> dict[str, Any]:
    return {"request_type": "alias", "environment": "production",
            "data": {"source_mpid": str(source), "destination_mpid": str(destination)}}


def event_batch(mpid: int | None = None, **fields: Any) -> dict[str, Any]:
    event = {"event_type": "custom_event",
             "data": {"event_name": "isolation", "custom_event_type": "other", "timestamp_unixtime_ms": now_ms() - 1000}}
    batch: dict[str, Any] = {"environment": "production", "events": [event], **fields}
    if mpid is not None:
        batch["mpid"] = str(mpid)
    return batch


def count_of(event_name: str) -> dict[str, Any]:
    return {"calculation_type": "count", "data_point": {"event_type": "custom_event", "event_name": event_name}}


def settle(server: LiveServer) -> None:
    """Wait for the calculations the server runs in the background (activation, upkeep after ingest): they write
    values, and a snapshot taken while one runs would see a change no request made."""
    on_server(server, background_idle(server.app.state.background_tasks))
    # aliases whose delay has passed are processed by a scheduler job at any moment; processing them here
    # means a snapshot never sees that job's write as a change some refused request made
    on_server(server, server.service.process_due_aliases())


def dsr_body(request_type: str, identities: dict[str, str], skip_waiting_period: bool = False, **fields: Any
             ) -> dict[str, Any]:
    return {"regulation": "gdpr", "subject_request_id": str(uuid.uuid4()), "subject_request_type": request_type,
            "submitted_time": datetime.now(UTC).isoformat(), "skip_waiting_period": skip_waiting_period,
            "api_version": "3.0", "subject_identities": {t: {"value": v, "encoding": "raw"} for t, v in identities.items()},
            **fields}


def process_due_requests(server: LiveServer) -> None:
    """Process the due data subject requests now, on the server's loop, rather than at the scheduler's next run."""
    on_server(server, server.app.state.dsr.process_due())


def on_server(server: LiveServer, coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result()


# --- the world: two workspaces with data in every public view ----------------------------------------------------
def seed(server: LiveServer, label: str, settings: dict[str, Any]) -> Tenant:
    name = unique(label)
    tenant = Tenant(server.create_workspace(settings, name=name), label, server.client())
    tenant.customer_id, tenant.other = unique(f"{label}-customer"), unique(f"{label}-other")
    tenant.email, tenant.device = unique(f"{label}-mail") + "@example.com", unique(f"{label}-device")
    tenant.known = tenant.new_profile({"customerid": tenant.customer_id, "email": tenant.email, "other": tenant.other},
                                      "login")
    tenant.anon = tenant.new_profile({"ios_idfv": tenant.device})
    event_name, attribute, document = unique(f"{label}-event"), unique(f"{label}-attribute"), unique(f"{label}-doc")
    tenant.event_name = event_name
    tenant.batch_id, tenant.request_id = unique(f"{label}-batch"), unique(f"{label}-request")
    batch = event_batch(tenant.anon, batch_id=tenant.batch_id, source_request_id=tenant.request_id,
                        user_attributes={"isolation_attribute": attribute},
                        consent_state={"gdpr": {"marketing": {"consented": True, "document": document,
                                                              "timestamp_unixtime_ms": now_ms() - 1000}}})
    batch["events"][0]["data"]["event_name"] = event_name
    tenant.call("/v2/events", batch)
    tenant.alias_id = tenant.call("/v1/alias", alias_body(tenant.anon, tenant.known))["alias_id"]  # copies the event
    hub_email = unique(f"{label}-hub") + "@example.com"
    tenant.hub_customers = [unique(f"{label}-customer") for _ in range(3)]
    for customer in tenant.hub_customers:  # three known profiles share an email: over hub_limit 2, it is quarantined
        tenant.new_profile({"customerid": customer, "email": hub_email}, "login")
    tenant.spare_pair = tenant.fresh_pair()
    tenant.ca_name = unique(f"{label}-ca")
    tenant.ca_id = tenant.new_attribute(count_of(event_name), tenant.ca_name)
    tenant.call(tenant.ca_path(f"/{tenant.ca_id}/activation"), None)  # computed in the background: settle()
    tenant.audience_name = unique(f"{label}-audience")
    tenant.audience_id = seed_audience(server, tenant.id, tenant.audience_name, [tenant.known, tenant.anon])
    apply_audience(server, tenant.id, tenant.audience_id, [tenant.known], now_ms())
    tenant.managed_audience_name = unique(f"{label}-managed-audience")
    tenant.managed_audience = tenant.call(tenant.audience_path(), {  # evaluated in the background: settle()
        "name": tenant.managed_audience_name, "criteria": {"event": {"event_name": event_name}}})["id"]
    tenant.connection_name, tenant.connection_secret = unique(f"{label}-connection"), unique(f"{label}-secret")
    tenant.connection_id = tenant.call(tenant.connection_path(), tenant.connection_body(
        tenant.connection_name, tenant.connection_secret))["id"]
    seed_delivery(server, tenant.id, tenant.connection_id, tenant.known, {"email": tenant.email, "mpid": str(tenant.known)})
    tenant.values = {tenant.id, tenant.key, tenant.secret, name, tenant.customer_id, tenant.other, tenant.email,
                     tenant.device, event_name, attribute, document, tenant.batch_id, tenant.request_id,
                     tenant.alias_id, hub_email, tenant.ca_name, tenant.audience_name,
                     tenant.managed_audience_name, tenant.connection_name, tenant.connection_secret,
                     *tenant.hub_customers}
    return tenant


def seed_requests(server: LiveServer, tenant: Tenant) -> None:
    """Data subject requests about the workspace's known profile: access only, so nothing is erased."""
    tenant.dsr_group = unique(f"{tenant.label}-group")
    tenant.dsr_pending = tenant.submit_dsr(group_id=tenant.dsr_group)  # waits out the waiting period (days)
    tenant.dsr_spare = tenant.submit_dsr()
    tenant.dsr_done = tenant.submit_dsr(skip_waiting_period=True)
    process_due_requests(server)  # the export of dsr_done now holds the person
    tenant.values |= {tenant.dsr_pending, tenant.dsr_spare, tenant.dsr_done, tenant.dsr_group}


def served_routes(server: LiveServer) -> set[str]:
    """From the app itself, the one the server runs."""
    return app_routes(server.app)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = LiveServer(tmp_path_factory.mktemp("isolation") / "idmesh.duckdb").start()
    tenants: list[Tenant] = []
    try:
        tenants.append(seed(server, "victim", {"key_only_auth": False, "hub_limit": 2}))
        tenants.append(seed(server, "attacker", {"key_only_auth": True, "hub_limit": 2}))
        routes = served_routes(server)
        for tenant in tenants:
            tenant.call(tenant.ca_path(f"/{tenant.ca_id}/seeds"), seeds_of(tenant.known))
            seed_requests(server, tenant)
        settle(server)
        database = server.query("SELECT current_database()")[0][0]
        with server.client() as http:
            yield World(server, http, tenants[0], tenants[1], database, routes, relations(server))
    finally:
        for tenant in tenants:
            tenant.http.close()
        server.stop()


# --- what was written, and what an answer reveals -----------------------------------------------------------------
# The journal shows through the views; the migrations never change; `consent` is the latest row per purpose of
# consent_history, which is compared, and the slowest view to read.
NOT_COMPARED = frozenset({"write_journal", "schema_migrations", "consent"})


def relations(server: LiveServer) -> dict[str, str | None]:
    """Every view, and every table no view shows, with the column naming its workspace (None: it has none). A
    `*_base` table and the journal show through their views, and the background fold moves rows between them, so
    comparing them would see a change where nothing was written. A table added later is compared too."""
    kinds = dict(server.query("SELECT table_name, table_type FROM information_schema.tables "
                              "WHERE table_catalog = current_database() AND table_schema = 'main'"))
    columns = dict(server.query("SELECT table_name, list(column_name) FROM duckdb_columns() "
                                "WHERE database_name = current_database() AND schema_name = 'main' GROUP BY ALL"))
    views = {name for name, kind in kinds.items() if kind == "VIEW"}
    found: dict[str, str | None] = {}
    for name in sorted(kinds):
        if name in NOT_COMPARED or (name.endswith("_base") and name[:-5] in views):
            continue
        found[name] = "id" if name == "workspaces" else next(
            (c for c in ("workspace_id", "scope") if c in columns[name]), None)
    return found


def state(world: World, workspace: Tenant | None = None) -> dict[str, tuple[int, int]]:
    """Row count and an order-free digest of each relation, all rows or one workspace's: equal states mean nothing
    was written."""
    found = {}
    for name, column in world.relations.items():
        if workspace is not None and column is None:
            continue
        where, params = ("", []) if workspace is None else (f' WHERE "{column}" = ?', [workspace.id])
        found[name] = world.server.query(f"SELECT count(*), sum(hash(t))::HUGEINT FROM {name} AS t{where}", *params)[0]
    return found


def current_state(world: World) -> dict[str, tuple[int, int]]:
    """state(world), reusing the last one while nothing can have been written since (a speed-up only)."""
    settle(world.server)
    cached, world.clean_state = world.clean_state, None
    if cached is not None and cached[0] == world.server.service.writer.commits:
        return cached[1]
    return state(world)


def victim_state(world: World) -> dict[str, Any]:
    """The victim's rows, and its in-memory graph as the admin sees it (a change there need not be a row yet)."""
    victim = world.victim
    seen: dict[str, Any] = dict(state(world, victim))
    for path in (f"/platform/v2/workspaces/{victim.id}/profiles/{victim.known}/graph",
                 f"/platform/v2/workspaces/{victim.id}/identity/hubs"):
        response = world.http.get(path, headers=admin())
        assert response.status_code == 200, response.text
        seen[path] = response.json()
    return seen


def answer_text(response: httpx.Response) -> str:
    if "parquet" in response.headers.get("content-type", ""):
        return str(pq.read_table(io.BytesIO(response.content)).to_pylist())  # compressed: read it back to compare
    return response.text


def assert_reveals_nothing(world: World, call: Call, response: httpx.Response, tenants: tuple[Tenant, ...]) -> None:
    """No string of those workspaces' data that the caller did not send or plant; and a successful answer holds
    none of their MPIDs at all (an identify answering the victim's MPID, sent as previous_mpid, would hand the
    profile over)."""
    text, sent = answer_text(response), call.sent()
    leaked = sorted(v for t in tenants for v in t.values if v in text and v not in sent and v not in world.planted)
    leaked += sorted(str(m) for t in tenants for m in t.mpids
                     if str(m) in text and (response.is_success or str(m) not in sent))
    assert not leaked, f"{call.path} answered {response.status_code} with {leaked}: {text[:400]}"


def send(world: World, method: str, call: Call, headers: HeaderMap) -> httpx.Response:
    if call.body is not None:
        headers = {"Content-Type": call.content_type, **headers}
    return world.http.request(method, call.path, params=call.params, content=call.content() or None, headers=headers)


# --- requests and attacks, route by route --------------------------------------------------------------------------
def identity_request(operation: str) -> Callable[[Tenant], Call]:
    def build(tenant: Tenant) -> Call:
        identities = {"login": {"customerid": unique(f"{tenant.label}-customer")},
                      "logout": {"ios_idfv": unique(f"{tenant.label}-device")}}.get(
            operation, {"email": unique(f"{tenant.label}-mail") + "@example.com"})
        return Call(f"/v1/{operation}", {"environment": "production", "known_identities": identities})
    return build


def identity_attacks(operation: str) -> Callable[[World], list[Attack]]:
    def build(world: World) -> list[Attack]:
        victim = world.victim
        identities = {"customerid": victim.hub_customers[0], "email": victim.email, "ios_idfv": victim.device}
        body = {"environment": "production", "known_identities": identities, "previous_mpid": str(victim.anon)}
        return [Attack("the victim's login ID, email and device, its MPID as previous_mpid",
                       Call(f"/v1/{operation}", body, {"return_matches": "true"}), frozenset({200})),
                Attack("the same, read only", Call(f"/v1/{operation}", body, {"read_only": "true"}),
                       frozenset({200, 404}))]
    return build


def search_attacks(world: World) -> list[Attack]:
    body = {"known_identities": {"other": world.victim.other}}
    return [Attack("an identity only the victim holds", Call("/v1/search", body), frozenset({404}))]


def modify_request(tenant: Tenant) -> Call:
    change = {"identity_type": "other", "old_value": None, "new_value": unique(f"{tenant.label}-other")}
    return Call(f"/v1/{tenant.known}/modify", {"environment": "production", "identity_changes": [change]})


def modify_attacks(world: World) -> list[Attack]:
    victim, attacker = world.victim, world.attacker
    own = attacker.new_profile({"ios_idfv": unique("attacker-device")})
    steal = {"identity_type": "customerid", "old_value": None, "new_value": victim.hub_customers[1]}
    return [Attack("the victim's MPID", modify_request(victim), frozenset({400})),
            # a unique ID is taken from every other holder on modify: only ever within the caller's workspace
            Attack("take the victim's customer ID onto the attacker's profile",
                   Call(f"/v1/{own}/modify", {"environment": "production", "identity_changes": [steal]}),
                   frozenset({200}))]


def alias_attacks(path: Callable[[Tenant], str]) -> Callable[[World], list[Attack]]:
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker
        mixed = alias_body(attacker.new_profile({"ios_idfv": unique("attacker-device")}), victim.spare_pair[1])
        named = dict(alias_body(*victim.spare_pair), api_key=victim.key)
        attacks = [Attack("the victim's two MPIDs", Call(path(attacker), alias_body(*victim.spare_pair)),
                          frozenset({400})),
                   Attack("the attacker's profile onto the victim's", Call(path(attacker), mixed), frozenset({400})),
                   Attack("the victim's api_key in the body", Call(path(attacker), named), frozenset({400}))]
        if path(victim) != path(attacker):  # the SDK paths carry a key: the victim's, with the attacker's credentials
            attacks.append(Attack("the victim's key in the path", Call(path(victim), alias_body(*victim.spare_pair)),
                                  frozenset({400})))
        return attacks
    return build


def unalias_attacks(world: World) -> list[Attack]:
    victim = world.victim
    pair = {"data": {"source_mpid": str(victim.anon), "destination_mpid": str(victim.known)}}
    return [Attack("the victim's alias_id", Call("/v1/unalias", {"alias_id": victim.alias_id}), frozenset({404})),
            Attack("the victim's aliased pair", Call("/v1/unalias", pair), frozenset({404}))]


def events_attacks(path: Callable[[Tenant], str], bulk: bool) -> Callable[[World], list[Attack]]:
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker

        def body(*batches: dict[str, Any]) -> Any:
            return list(batches) if bulk else batches[0]

        own_identities = event_batch(user_identities={"customer_id": victim.hub_customers[2]})
        attacks = [Attack("the victim's MPID", Call(path(attacker), body(event_batch(victim.known))), frozenset({400})),
                   Attack("the victim's customer ID: resolved in the attacker's workspace",
                          Call(path(attacker), body(own_identities)), frozenset({202}))]
        if path(victim) != path(attacker):
            attacks.append(Attack("the victim's key in the path, the victim's MPID",
                                  Call(path(victim), body(event_batch(victim.known))), frozenset({400})))
        if bulk:
            # replay keys belong to a workspace: the victim's ids neither drop the attacker's batches nor tell it
            # that the victim used them
            reused = body(event_batch(attacker.known, batch_id=victim.batch_id),
                          event_batch(attacker.known, source_request_id=victim.request_id))
            attacks.append(Attack("the victim's batch_id and source_request_id", Call(path(attacker), reused),
                                  frozenset({202}), check=all_accepted, once=True))
        return attacks
    return build


def all_accepted(response: httpx.Response) -> None:
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "accepted"], response.text


def workspace_attacks(suffix: str, params: dict[str, str] | None = None) -> Callable[[World], list[Attack]]:
    """Routes under /platform/v2/workspaces/{id}: the victim's id, and a made-up id (answered like the victim's, so
    the answer does not tell which workspaces exist)."""
    def build(world: World) -> list[Attack]:
        paths = {"the victim's workspace id": f"/platform/v2/workspaces/{world.victim.id}",
                 "a workspace id that does not exist": f"/platform/v2/workspaces/ws_{secrets.token_hex(8)}"}
        return [Attack(what, Call(path + suffix.format(mpid=world.victim.known), params=params or {}),
                       frozenset({403})) for what, path in paths.items()]
    return build


def graph_attacks(world: World) -> list[Attack]:
    victim, attacker = world.victim, world.attacker
    attacks = workspace_attacks("/profiles/{mpid}/graph")(world) + workspace_attacks(
        "/profiles/{mpid}/graph", {"format": "svg"})(world)
    for fmt in ("json", "svg"):
        path = f"/platform/v2/workspaces/{attacker.id}/profiles/{victim.known}/graph"
        attacks.append(Attack(f"the victim's MPID under the attacker's id ({fmt})", Call(path, params={"format": fmt}),
                              frozenset({404})))
    return attacks


def hubs_attacks(world: World) -> list[Attack]:
    own = Call(f"/platform/v2/workspaces/{world.attacker.id}/identity/hubs")
    return workspace_attacks("/identity/hubs")(world) + [
        Attack("the attacker's own hub report lists none of the victim's values", own, frozenset({200}))]


def profile_request(tenant: Tenant) -> Call:
    return Call(f"/userprofile/v1/org/account/{tenant.id}/{tenant.known}", params={"fields": ",".join(PROFILE_FIELDS)})


def profile_attacks(world: World) -> list[Attack]:
    victim, attacker = world.victim, world.attacker
    fields = {"fields": ",".join(PROFILE_FIELDS)}
    return [Attack("the victim's workspace id", profile_request(victim), frozenset({403})),
            Attack("the victim's MPID under the attacker's id",
                   Call(f"/userprofile/v1/org/account/{attacker.id}/{victim.known}", params=fields), frozenset({404})),
            Attack("the victim's aliased-away MPID under the attacker's id",
                   Call(f"/userprofile/v1/org/account/{attacker.id}/{victim.anon}", params=fields), frozenset({404}))]


def resolve_request(tenant: Tenant) -> Call:
    return Call(f"/userprofile/v1/resolve/org/account/{tenant.id}",
                {"identity": {"type": "customer_id", "value": tenant.customer_id}},
                {"fields": ",".join(PROFILE_FIELDS)})


def resolve_attacks(world: World) -> list[Attack]:
    victim, attacker = world.victim, world.attacker
    under_attacker = Call(resolve_request(victim).path.replace(victim.id, attacker.id), resolve_request(victim).body,
                          {"fields": ",".join(PROFILE_FIELDS)})
    return [Attack("the victim's workspace id", resolve_request(victim), frozenset({403})),
            Attack("the victim's customer ID under the attacker's id", under_attacker, frozenset({404}))]


def sql(query: str, **fields: Any) -> Call:
    return Call("/v1/sql", {"sql": query, **fields})


def no_rows(response: httpx.Response) -> None:
    assert response.json()["rows"] == [], response.text


def only_rows_of(workspace: Tenant, column: str) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        answer = response.json()
        index = [c["name"] for c in answer["columns"]].index(column)
        assert answer["rows"] and {row[index] for row in answer["rows"]} == {workspace.id}, response.text[:400]
    return check


def sql_attacks(world: World) -> list[Attack]:
    """Every way we know to name rows in SQL: each must answer only the attacker's rows or be refused."""
    victim, database = world.victim, world.database
    filtered, refused, either = frozenset({200}), frozenset({400}), frozenset({200, 400})
    attacks = []
    # once each: past authentication the credential form makes no difference, and the other routes cover that
    for view, column in sorted(PUBLIC_VIEWS.items()):
        attacks += [Attack(f"all of {view}", sql(f"SELECT * FROM {view}"), filtered, only_rows_of(world.attacker, column),
                           once=True),
                    Attack(f"{view} of the victim's workspace",
                           sql(f"SELECT * FROM {view} WHERE {column} = '{victim.id}' OR {column} <> '{world.attacker.id}'"),
                           filtered, no_rows, once=True)]
    for view in ("audiences", "audience_members", "audience_stats"):
        attacks.append(Attack(f"the victim's audience in {view}", sql(
            f"SELECT * FROM {view} WHERE {'id' if view == 'audiences' else 'audience_id'} = {victim.audience_id}"),
            filtered, no_rows, once=True))
    for view in ("identities", "events"):  # the qualified names behind the filtered views, refused by name shape
        attacks += [Attack(f"main.{view}", sql(f"SELECT * FROM main.{view}"), refused, once=True),
                    Attack(f"{database}.main.{view}", sql(f'SELECT * FROM "{database}".main.{view}'), refused, once=True),
                    Attack(f"{database}.{view}", sql(f'SELECT * FROM "{database}".{view}'), refused, once=True),
                    Attack(f"temp.{view}", sql(f"SELECT * FROM temp.{view}"), refused, once=True),
                    Attack(f"{view} in CSV", sql(f"SELECT * FROM {view}", format="csv"), filtered, once=True),
                    Attack(f"{view} in Parquet", sql(f"SELECT * FROM {view}", format="parquet"), filtered, once=True)]
    queries: list[tuple[str, str, frozenset[int]]] = [
        ("other spellings", 'SELECT * FROM PROFILES, "Identities" AS i', filtered),
        ("a string in FROM", "SELECT * FROM 'identities'", either),
        ("a CTE over a view", "WITH x AS (SELECT * FROM identities) SELECT * FROM x", filtered),
        ("a CTE named like the view", "WITH identities AS (SELECT * FROM identities) SELECT * FROM identities", filtered),
        ("a materialized CTE", "WITH x AS MATERIALIZED (SELECT * FROM events) SELECT * FROM x", filtered),
        ("a recursive CTE", "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
                            "SELECT * FROM r, identities", filtered),
        ("a CTE over main", "WITH x AS (SELECT * FROM main.identities) SELECT * FROM x", refused),
        ("a subquery in WHERE", f"SELECT * FROM events WHERE mpid IN (SELECT mpid FROM identities "
                                f"WHERE value = '{victim.email}')", filtered),
        ("a scalar subquery", "SELECT (SELECT string_agg(value, ',') FROM identities) AS v", filtered),
        ("a subquery in a lambda", "SELECT list_transform([1], x -> (SELECT list(value) FROM identities)) AS v", either),
        ("a lateral join", "SELECT * FROM profiles p, LATERAL (SELECT * FROM identities i WHERE i.mpid = p.mpid)",
         filtered),
        ("a subquery over main", "SELECT * FROM (SELECT * FROM main.events)", refused),
        ("UNION of every MPID column", "SELECT mpid FROM profiles UNION SELECT mpid FROM identities UNION "
                                       "SELECT source_mpid FROM aliases UNION SELECT destination_mpid FROM aliases UNION "
                                       "SELECT mpid FROM events UNION SELECT copied_from_mpid FROM events UNION "
                                       "SELECT mpid FROM user_attributes UNION SELECT mpid FROM consent_history UNION "
                                       "SELECT mpid FROM audience_members UNION SELECT mpid FROM "
                                       "audience_membership_history", filtered),
        ("UNION with main", "SELECT * FROM identities UNION ALL SELECT * FROM main.identities", refused),
        ("aggregates", "SELECT count(*), min(mpid), max(mpid), string_agg(value, ','), list(raw_value), "
                       "approx_count_distinct(value) FROM identities", filtered),
        ("GROUP BY scope", "SELECT scope, count(*), list(mpid) FROM profiles GROUP BY ALL", filtered),
        ("arg_max", "SELECT arg_max(mpid, created_ms), arg_min(value, added_ms) FROM identities", either),
        ("a window", "SELECT value, count(*) OVER (), first(value) OVER () FROM identities", filtered),
        ("PIVOT", "PIVOT identities ON identity_type USING first(value)", either),
        ("FROM first", "FROM identities SELECT *", filtered),
        ("a sample", "SELECT * FROM identities USING SAMPLE 100 PERCENT (bernoulli)", filtered),
        ("SUMMARIZE", "SUMMARIZE identities", filtered),
        ("SUMMARIZE in FROM", "SELECT * FROM (SUMMARIZE events)", filtered),
        ("DESCRIBE", "DESCRIBE events", filtered),
        ("DESCRIBE main", "DESCRIBE main.events", refused),
        ("a base table", "SELECT * FROM identities_base", refused),
        ("the journal", "SELECT * FROM write_journal", refused),
        ("the workspaces table", "SELECT * FROM workspaces", refused),
        ("query_table()", "SELECT * FROM query_table('identities_base')", refused),
        ("query()", "SELECT * FROM query('SELECT * FROM main.identities')", refused),
        ("the catalog", "SELECT * FROM duckdb_views()", refused),
        ("information_schema", "SELECT * FROM information_schema.tables", refused),
        ("pg_catalog", "SELECT * FROM pg_catalog.pg_views", refused),
        ("SHOW", "SHOW ALL TABLES", refused),
        ("stats()", "SELECT stats(value) FROM identities", refused),
        ("an error quoting a row", "SELECT CAST(value AS INTEGER) FROM identities", refused),
        ("error() of a row", "SELECT error(value) FROM identities", refused),
        ("data subject requests", "SELECT * FROM dsr_requests", refused),
        ("access exports", "SELECT * FROM dsr_exports", refused),
        ("the audience views joined", "SELECT a.name, a.definition, m.mpid, s.size, s.volatility FROM audiences a "
                                      "JOIN audience_members m ON m.audience_id = a.id "
                                      "JOIN audience_stats s ON s.audience_id = a.id", filtered),
        ("audience history aggregates", "SELECT audience_id, count(*), list(mpid), min(entered_ms), max(exited_ms) "
                                        "FROM audience_membership_history GROUP BY ALL", filtered),
        ("audience sizes in a window", "SELECT audience_id, sum(adds) OVER (PARTITION BY audience_id ORDER BY at_ms) "
                                       "FROM audience_sizes", filtered),
        ("the definitions table", "SELECT * FROM audience_definitions", refused),
    ]
    signed_too = [Attack("all identities (every credential form)", sql("SELECT * FROM identities"), filtered,
                         only_rows_of(world.attacker, "scope"))]
    return attacks + signed_too + [Attack(what, sql(query), expect, once=True) for what, query, expect in queries]


def dsr_submit_attacks(world: World) -> list[Attack]:
    """Requests about the victim's person through the attacker's workspace: found nowhere, so processing them (at
    once: skip_waiting_period) erases or exports nothing of the victim's."""
    victim, attacker = world.victim, world.attacker

    def submit(what: str, request_type: str, identities: dict[str, str], after: Callable[[str], None]) -> Attack:
        body = dsr_body(request_type, identities, skip_waiting_period=True)
        return Attack(what, Call("/v3/requests", body), frozenset({202, 400}),
                      check=lambda response: after(body["subject_request_id"]) if response.is_success else None)

    def processed(request_id: str) -> None:
        process_due_requests(world.server)

    def exported(request_id: str) -> None:
        process_due_requests(world.server)
        call = Call(f"/v3/requests/{request_id}/export")
        response = send(world, "GET", call, basic(attacker.key, attacker.secret))
        assert response.status_code == 200, response.text
        assert_reveals_nothing(world, call, response, (victim,))

    reused = dsr_body("access", {"controller_customer_id": attacker.customer_id}, subject_request_id=victim.dsr_spare)
    return [submit("an erasure of the victim's MPID", "erasure", {"mpid": str(victim.known)}, processed),
            submit("an erasure of the victim's customer ID", "erasure", {"controller_customer_id": victim.customer_id},
                   processed),
            # the attacker's own profiles hold these (the IDSync attacks gave them to it): only those may go
            submit("an erasure of the victim's email and device", "erasure",
                   {"email": victim.email, "ios_vendor_id": victim.device}, processed),
            submit("an access request for the victim's MPID", "access", {"mpid": str(victim.known)}, exported),
            submit("an access request for the victim's customer ID", "access",
                   {"controller_customer_id": victim.customer_id}, exported),
            # a subject_request_id belongs to its workspace: a 409 would tell the attacker the victim used it
            Attack("the victim's subject_request_id", Call("/v3/requests", reused), frozenset({202}), once=True)]


def dsr_request_attacks(suffix: str, expect: frozenset[int]) -> Callable[[World], list[Attack]]:
    def build(world: World) -> list[Attack]:
        victim = world.victim
        return [Attack(f"the victim's {what} request", Call(f"/v3/requests/{request_id}{suffix}"), expect)
                for what, request_id in (("waiting", victim.dsr_pending), ("completed", victim.dsr_done))]
    return build


def dsr_list_attacks(world: World) -> list[Attack]:
    listed = Call("/v3/requests", params={"group_id": world.victim.dsr_group})
    return [Attack("the attacker's own list", Call("/v3/requests"), frozenset({200})),
            Attack("the victim's group_id", listed, frozenset({200}), check=lambda r: assert_equal(r.json(), []))]


def assert_equal(found: Any, expected: Any) -> None:
    assert found == expected


def ca_attacks(suffix: str, body: Any = None) -> Callable[[World], list[Attack]]:
    """Calculated attributes: the victim's workspace (403), a made-up one (403 too: no existence oracle), and the
    victim's attribute id under the attacker's own workspace (404, as for an id nobody has)."""
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker
        tail = suffix.format(ca_id=victim.ca_id)
        made_up = f"/platform/v2/workspaces/ws_{secrets.token_hex(8)}/calculatedattributes{tail}"
        attacks = [Attack("the victim's workspace", Call(victim.ca_path(tail), body), frozenset({403})),
                   Attack("a workspace id that does not exist", Call(made_up, body), frozenset({403}))]
        if "{ca_id}" in suffix:
            attacks.append(Attack("the victim's attribute under the attacker's workspace",
                                  Call(attacker.ca_path(tail), body), frozenset({404})))
        return attacks
    return build


def seeds_of(mpid: int) -> dict[str, Any]:
    return {"seeds": [{"mpid": str(mpid), "value": 5, "as_of": "2020-01-01T00:00:00Z"}]}


def ca_seed_attacks(world: World) -> list[Attack]:
    victim, attacker = world.victim, world.attacker
    own = Call(attacker.ca_path(f"/{attacker.ca_id}/seeds"), seeds_of(victim.known))
    return ca_attacks("/{ca_id}/seeds", seeds_of(victim.known))(world) + [
        Attack("the victim's MPID seeded on the attacker's own attribute", own, frozenset({400}))]


def ca_create_attacks(world: World) -> list[Attack]:
    named = {"name": world.victim.ca_name, "draft_definition": count_of("isolation")}
    # names are per workspace: a 409 would tell the attacker the victim has an attribute of that name
    return ca_attacks("", {"name": unique("attacker-ca"), "draft_definition": count_of("isolation")})(world) + [
        Attack("the victim's attribute name", Call(world.attacker.ca_path(), named), frozenset({201}), once=True)]


def ca_activation_attacks(world: World) -> list[Attack]:
    """An attribute of the attacker's counting the victim's event: computed over the attacker's events only."""
    own = world.attacker.new_attribute(count_of(world.victim.event_name))
    world.planted.add(world.victim.event_name)  # the attacker's own definition holds it now

    def counted_nothing(response: httpx.Response) -> None:
        settle(world.server)
        counted = world.server.query("SELECT count(*) FROM calculated_attribute_values WHERE ca_id = ? "
                                     "AND TRY_CAST(value::VARCHAR AS DOUBLE) > 0", own)
        assert counted == [(0,)], f"attribute {own} of the attacker counted the victim's events"

    return ca_attacks("/{ca_id}/activation")(world) + [
        Attack("an attribute counting the victim's event", Call(world.attacker.ca_path(f"/{own}/activation")),
               frozenset({204}), check=counted_nothing)]


def audience_attacks(suffix: str, body: Any = None) -> Callable[[World], list[Attack]]:
    """Audiences, as calculated attributes: the victim's workspace and a made-up one (403 both: no existence
    oracle), the victim's audience id under the attacker's own workspace (404, as an id nobody has)."""
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker
        tail = suffix.format(audience_id=victim.managed_audience)
        made_up = f"/platform/v2/workspaces/ws_{secrets.token_hex(8)}/audiences{tail}"
        attacks = [Attack("the victim's workspace", Call(victim.audience_path(tail), body), frozenset({403})),
                   Attack("a workspace id that does not exist", Call(made_up, body), frozenset({403}))]
        if "{audience_id}" in suffix:
            attacks.append(Attack("the victim's audience under the attacker's workspace",
                                  Call(attacker.audience_path(tail), body), frozenset({404})))
        return attacks
    return build


def criteria_attacks(path: str, body: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[World], list[Attack]]:
    """Criteria naming the victim's audience or calculated attribute: refused as ids nobody has (400)."""
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker
        target = attacker.audience_path(path.format(audience_id=attacker.managed_audience))
        return audience_attacks(path, body({"identity": {"type": "email"}}))(world) + [
            Attack("the victim's audience in the criteria",
                   Call(target, body({"audience": {"id": victim.managed_audience}})), frozenset({400})),
            Attack("the victim's calculated attribute in the criteria", Call(target, body(
                {"calculated_attribute": {"id": victim.ca_id, "operator": "exists"}})), frozenset({400}))]
    return build


def audience_create_attacks(world: World) -> list[Attack]:
    named = {"name": world.victim.managed_audience_name, "criteria": {"identity": {"type": "email"}}}
    # names are per workspace: a 409 would tell the attacker the victim has an audience of that name
    return criteria_attacks("", lambda criteria: {"name": unique("attacker-audience"), "criteria": criteria})(world) + [
        Attack("the victim's audience name", Call(world.attacker.audience_path(), named), frozenset({201}), once=True)]


def audience_preview_attacks(world: World) -> list[Attack]:
    """Criteria on the victim's event, previewed in the attacker's workspace: only the attacker's profiles count."""
    def matched_nothing(response: httpx.Response) -> None:
        assert response.json()["size"] == 0 and response.json()["sample"] == [], response.text

    world.planted.add(world.victim.event_name)  # the attacker's own request holds it now
    own = Call(world.attacker.audience_path("/preview"), {"criteria": {"event": {"event_name": world.victim.event_name}}})
    return criteria_attacks("/preview", lambda criteria: {"criteria": criteria})(world) + [
        Attack("criteria matching the victim's event", own, frozenset({200}), check=matched_nothing)]


def connection_attacks(suffix: str, body: Any = None) -> Callable[[World], list[Attack]]:
    """Connections, as audiences: the victim's workspace and a made-up one (403 both), the victim's audience under
    the attacker's workspace (404), and the victim's connection id under the attacker's own audience (404)."""
    def build(world: World) -> list[Attack]:
        victim, attacker = world.victim, world.attacker
        tail = f"/{victim.managed_audience}/connections" + suffix.format(connection_id=victim.connection_id)
        made_up = f"/platform/v2/workspaces/ws_{secrets.token_hex(8)}/audiences{tail}"
        attacks = [Attack("the victim's workspace", Call(victim.audience_path(tail), body), frozenset({403})),
                   Attack("a workspace id that does not exist", Call(made_up, body), frozenset({403})),
                   Attack("the victim's audience under the attacker's workspace", Call(attacker.audience_path(tail), body),
                          frozenset({404}))]
        if "{connection_id}" in suffix:
            attacks.append(Attack("the victim's connection under the attacker's audience", Call(
                attacker.connection_path(suffix.format(connection_id=victim.connection_id)), body), frozenset({404})))
        return attacks
    return build


def admin_only_attacks(case: RouteCase) -> Callable[[World], list[Attack]]:
    def build(world: World) -> list[Attack]:
        return [Attack("the attacker's own credentials on the victim's workspace", case.request(world.victim),
                       frozenset({401, 403}))]
    return build


def api_description(path: str) -> RouteCase:
    """FastAPI's API description: the same document for every deployment, no workspace in it."""
    return RouteCase(Auth.PUBLIC, lambda tenant: Call(path), 200)


def workspace_path(suffix: str = "") -> Callable[[Tenant], Call]:
    return lambda tenant: Call(f"/platform/v2/workspaces/{tenant.id}{suffix.format(mpid=tenant.known)}")


CA = "GET /platform/v2/workspaces/{workspace_id}/calculatedattributes"
SEEDS = f"POST {CA[4:]}/{{ca_id}}/seeds"
ROUTES: dict[str, RouteCase] = {
    "GET /healthz": RouteCase(Auth.PUBLIC, lambda tenant: Call("/healthz"), 200),
    "GET /openapi.json": api_description("/openapi.json"),
    "GET /docs": api_description("/docs"),
    "GET /docs/oauth2-redirect": api_description("/docs/oauth2-redirect"),
    "GET /redoc": api_description("/redoc"),
    # IDSync: the web SDK calls these with its key alone
    "POST /v1/identify": RouteCase(Auth.KEY_ONLY_ALLOWED, identity_request("identify"), 200,
                                   attacks=identity_attacks("identify")),
    "POST /v1/login": RouteCase(Auth.KEY_ONLY_ALLOWED, identity_request("login"), 200, attacks=identity_attacks("login")),
    "POST /v1/logout": RouteCase(Auth.KEY_ONLY_ALLOWED, identity_request("logout"), 200,
                                 attacks=identity_attacks("logout")),
    "POST /v1/search": RouteCase(
        Auth.KEY_ONLY_ALLOWED, lambda t: Call("/v1/search", {"known_identities": {"email": t.email}}), 200,
        attacks=search_attacks),
    "POST /v1/{mpid}/modify": RouteCase(Auth.KEY_ONLY_ALLOWED, modify_request, 200, attacks=modify_attacks),
    "POST /v1/identity/{api_key}/alias": RouteCase(
        Auth.KEY_ONLY_ALLOWED, lambda t: Call(f"/v1/identity/{t.key}/alias", alias_body(*t.fresh_pair())), 202,
        attacks=alias_attacks(lambda t: f"/v1/identity/{t.key}/alias")),
    "POST /v1/identity/{api_key}/Alias": RouteCase(
        Auth.KEY_ONLY_ALLOWED, lambda t: Call(f"/v1/identity/{t.key}/Alias", alias_body(*t.fresh_pair())), 202,
        attacks=alias_attacks(lambda t: f"/v1/identity/{t.key}/Alias")),
    # server to server
    "POST /v1/alias": RouteCase(Auth.SECRET, lambda t: Call("/v1/alias", alias_body(*t.fresh_pair())), 202,
                                attacks=alias_attacks(lambda t: "/v1/alias")),
    "POST /v1/unalias": RouteCase(Auth.SECRET, lambda t: Call("/v1/unalias", {"alias_id": t.fresh_alias()}), 200,
                                  attacks=unalias_attacks),
    "POST /v2/events": RouteCase(Auth.SECRET, lambda t: Call("/v2/events", event_batch(t.known)), 202,
                                 attacks=events_attacks(lambda t: "/v2/events", bulk=False)),
    "POST /v2/bulkevents": RouteCase(Auth.SECRET, lambda t: Call("/v2/bulkevents", [event_batch(t.known)]), 202,
                                     attacks=events_attacks(lambda t: "/v2/bulkevents", bulk=True)),
    "POST /v3/JS/{api_key}/events": RouteCase(
        Auth.KEY_ONLY_ALLOWED, lambda t: Call(f"/v3/JS/{t.key}/events", event_batch(t.known), content_type="text/plain"),
        202, attacks=events_attacks(lambda t: f"/v3/JS/{t.key}/events", bulk=False)),
    "POST /v1/sql": RouteCase(Auth.SECRET, lambda t: sql("SELECT count(*) FROM profiles"), 200, admin_too=True,
                              attacks=sql_attacks),
    # Profile API and the platform reads of one workspace: the admin, or that workspace's own key + secret
    "GET /userprofile/v1/{org_id}/{account_id}/{workspace_id}/{mpid}": RouteCase(
        Auth.SECRET, profile_request, 200, admin_too=True, attacks=profile_attacks),
    "POST /userprofile/v1/resolve/{org_id}/{account_id}/{workspace_id}": RouteCase(
        Auth.SECRET, resolve_request, 200, admin_too=True, attacks=resolve_attacks),
    "GET /platform/v2/workspaces/{workspace_id}": RouteCase(Auth.SECRET, workspace_path(), 200, admin_too=True,
                                                            attacks=workspace_attacks("")),
    "GET /platform/v2/workspaces/{workspace_id}/profiles/{mpid}/graph": RouteCase(
        Auth.SECRET, workspace_path("/profiles/{mpid}/graph"), 200, admin_too=True, attacks=graph_attacks),
    "GET /platform/v2/workspaces/{workspace_id}/identity/hubs": RouteCase(
        Auth.SECRET, workspace_path("/identity/hubs"), 200, admin_too=True, attacks=hubs_attacks),
    # the admin only
    "POST /platform/v2/workspaces": RouteCase(
        Auth.ADMIN, lambda t: Call("/platform/v2/workspaces", {"name": unique("intruder"), "settings": {}}), 201),
    "GET /platform/v2/workspaces": RouteCase(Auth.ADMIN, lambda t: Call("/platform/v2/workspaces"), 200),
    "PUT /platform/v2/workspaces/{workspace_id}": RouteCase(
        Auth.ADMIN, lambda t: Call(f"/platform/v2/workspaces/{t.id}",
                                   {"name": unique(t.label), "settings": {"key_only_auth": True, "hub_limit": 2}}), 200),
    "POST /platform/v2/workspaces/{workspace_id}/events": RouteCase(
        Auth.ADMIN, lambda t: Call(f"/platform/v2/workspaces/{t.id}/events", [event_batch(t.known)]), 202),
    # calculated attributes: the admin, or the workspace's own key + secret
    CA: RouteCase(Auth.SECRET, lambda t: Call(t.ca_path()), 200, admin_too=True, attacks=ca_attacks("")),
    f"HEAD {CA[4:]}": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path()), 204, admin_too=True, attacks=ca_attacks("")),
    f"POST {CA[4:]}": RouteCase(
        Auth.SECRET, lambda t: Call(t.ca_path(), {"name": unique(t.label), "draft_definition": count_of("x")}), 201,
        admin_too=True, attacks=ca_create_attacks),
    f"{CA}/{{ca_id}}": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.ca_id}")), 200, admin_too=True,
                                 attacks=ca_attacks("/{ca_id}")),
    f"PUT {CA[4:]}/{{ca_id}}": RouteCase(
        Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.ca_id}"), {"description": unique(t.label)}), 204, admin_too=True,
        attacks=ca_attacks("/{ca_id}", {"description": "changed by another workspace"})),
    f"DELETE {CA[4:]}/{{ca_id}}": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.new_attribute()}")), 204,
                                            admin_too=True, attacks=ca_attacks("/{ca_id}")),
    f"DELETE {CA[4:]}/{{ca_id}}/draft": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.drafted()}/draft")), 204,
                                                  admin_too=True, attacks=ca_attacks("/{ca_id}/draft")),
    f"POST {CA[4:]}/{{ca_id}}/activation": RouteCase(
        Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.new_attribute()}/activation")), 204, admin_too=True,
        attacks=ca_activation_attacks),
    SEEDS: RouteCase(
        Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.ca_id}/seeds"), seeds_of(t.known)), 202, admin_too=True,
        attacks=ca_seed_attacks),
    f"{CA}/{{ca_id}}/activation": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.ca_id}/activation")), 200,
                                            admin_too=True, attacks=ca_attacks("/{ca_id}/activation")),
    f"{CA}/{{ca_id}}/calculation": RouteCase(Auth.SECRET, lambda t: Call(t.ca_path(f"/{t.ca_id}/calculation")), 200,
                                             admin_too=True, attacks=ca_attacks("/{ca_id}/calculation")),
    # data subject requests (OpenDSR v3): the controller's key + secret
    "POST /v3/requests": RouteCase(
        Auth.SECRET, lambda t: Call("/v3/requests", dsr_body("access", {"controller_customer_id": t.customer_id})), 202,
        attacks=dsr_submit_attacks),
    "GET /v3/requests": RouteCase(Auth.SECRET, lambda t: Call("/v3/requests"), 200, attacks=dsr_list_attacks),
    "GET /v3/requests/{subject_request_id}": RouteCase(
        Auth.SECRET, lambda t: Call(f"/v3/requests/{t.dsr_pending}"), 200,
        attacks=dsr_request_attacks("", frozenset({404}))),
    "DELETE /v3/requests/{subject_request_id}": RouteCase(
        Auth.SECRET, lambda t: Call(f"/v3/requests/{t.submit_dsr()}"), 202,
        attacks=dsr_request_attacks("", frozenset({404}))),
    "GET /v3/requests/{subject_request_id}/export": RouteCase(
        Auth.SECRET, lambda t: Call(f"/v3/requests/{t.dsr_done}/export"), 200,
        attacks=dsr_request_attacks("/export", frozenset({404}))),
    # OpenDSR §8.8: a controller checking a callback's signature fetches these without credentials
    "GET /v3/discovery": RouteCase(Auth.PUBLIC, lambda t: Call("/v3/discovery"), 200),
    "GET /v3/discovery/": RouteCase(Auth.PUBLIC, lambda t: Call("/v3/discovery/"), 200),
    "GET /v3/processor_certificate.pem": RouteCase(Auth.PUBLIC, lambda t: Call("/v3/processor_certificate.pem"), 200),
}
AUDIENCES = "/platform/v2/workspaces/{workspace_id}/audiences"
AUDIENCE = f"{AUDIENCES}/{{audience_id}}"
EMAILED = {"identity": {"type": "email"}}
ROUTES |= {
    f"GET {AUDIENCES}": RouteCase(Auth.SECRET, lambda t: Call(t.audience_path()), 200, admin_too=True,
                                  attacks=audience_attacks("")),
    f"POST {AUDIENCES}": RouteCase(
        Auth.SECRET, lambda t: Call(t.audience_path(), {"name": unique(t.label), "criteria": EMAILED}), 201,
        admin_too=True, attacks=audience_create_attacks),
    f"POST {AUDIENCES}/preview": RouteCase(
        Auth.SECRET, lambda t: Call(t.audience_path("/preview"), {"criteria": EMAILED}), 200,
        admin_too=True, attacks=audience_preview_attacks),
    f"GET {AUDIENCE}": RouteCase(Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.managed_audience}")), 200,
                                 admin_too=True, attacks=audience_attacks("/{audience_id}")),
    f"PUT {AUDIENCE}": RouteCase(
        Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.managed_audience}"), {"description": unique(t.label)}), 200,
        admin_too=True, attacks=criteria_attacks("/{audience_id}", lambda criteria: {"criteria": criteria})),
    f"DELETE {AUDIENCE}": RouteCase(Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.new_audience()}")), 204,
                                    admin_too=True, attacks=audience_attacks("/{audience_id}")),
    f"GET {AUDIENCE}/size.svg": RouteCase(Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.managed_audience}/size.svg")),
                                          200, admin_too=True, attacks=audience_attacks("/{audience_id}/size.svg")),
    f"POST {AUDIENCE}/calculation": RouteCase(
        Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.managed_audience}/calculation")), 202, admin_too=True,
        attacks=audience_attacks("/{audience_id}/calculation")),
    f"GET {AUDIENCE}/calculation": RouteCase(
        Auth.SECRET, lambda t: Call(t.audience_path(f"/{t.managed_audience}/calculation")), 200, admin_too=True,
        attacks=audience_attacks("/{audience_id}/calculation")),
    # connections of an audience to outputs: as audiences
    f"GET {AUDIENCE}/connections": RouteCase(Auth.SECRET, lambda t: Call(t.connection_path()), 200, admin_too=True,
                                             attacks=connection_attacks("")),
    f"POST {AUDIENCE}/connections": RouteCase(Auth.SECRET, lambda t: Call(t.connection_path(), t.connection_body()), 201,
                                              admin_too=True, attacks=connection_attacks("", {"output": "kafka"})),
    f"GET {AUDIENCE}/connections/{{connection_id}}": RouteCase(
        Auth.SECRET, lambda t: Call(t.connection_path(f"/{t.connection_id}")), 200, admin_too=True,
        attacks=connection_attacks("/{connection_id}")),
    f"PUT {AUDIENCE}/connections/{{connection_id}}": RouteCase(
        Auth.SECRET, lambda t: Call(t.connection_path(f"/{t.connection_id}"), {"name": unique(t.label)}), 200,
        admin_too=True, attacks=connection_attacks("/{connection_id}", {"status": "inactive"})),
    f"DELETE {AUDIENCE}/connections/{{connection_id}}": RouteCase(
        Auth.SECRET, lambda t: Call(t.connection_path(f"/{t.new_connection()}")), 204, admin_too=True,
        attacks=connection_attacks("/{connection_id}")),
    # a full resync of an (inactive webhook) connection: an add queued for every member
    f"POST {AUDIENCE}/connections/{{connection_id}}/resync": RouteCase(
        Auth.SECRET, lambda t: Call(t.connection_path(f"/{t.connection_id}/resync")), 200, admin_too=True,
        attacks=connection_attacks("/{connection_id}/resync")),
    # one org per deployment: every workspace's audiences, so the admin token only
    "GET /platform/v2/audiences": RouteCase(Auth.ADMIN, lambda t: Call("/platform/v2/audiences", params={"accountId": "1"}),
                                            200),
}
ROUTE_KEYS = sorted(ROUTES)
PUBLIC = frozenset({"GET /healthz", "GET /openapi.json", "GET /docs", "GET /docs/oauth2-redirect", "GET /redoc",
                    "GET /v3/discovery", "GET /v3/discovery/", "GET /v3/processor_certificate.pem"})


# --- credentials -------------------------------------------------------------------------------------------------
def accepted_credentials(case: RouteCase, call: Call, world: World) -> list[tuple[str, Headers]]:
    """Credentials that must reach the route, for a request on the attacker's own data."""
    attacker = world.attacker
    if case.auth is Auth.PUBLIC:
        return [("no credentials", lambda w, m, c: {})]
    if case.auth is Auth.ADMIN:
        return [("the admin token", lambda w, m, c: admin())]
    found: list[tuple[str, Headers]] = [
        ("key + secret (Basic)", lambda w, m, c: basic(attacker.key, attacker.secret)),
        ("HMAC signature", lambda w, m, c: signed(attacker.key, attacker.secret, m, c))]
    if case.admin_too:
        found.append(("the admin token", lambda w, m, c: admin()))
    if case.auth is Auth.KEY_ONLY_ALLOWED:
        found.append(("the key alone in x-mp-key, key_only_auth on", lambda w, m, c: {"x-mp-key": attacker.key}))
        if attacker.key in call.path:
            found.append(("the key alone in the path, key_only_auth on", lambda w, m, c: {}))
    return found


def refused_credentials(case: RouteCase, world: World, every_form: bool) -> list[tuple[str, Headers, frozenset[int]]]:
    """Credentials that must get a 401 (403 allowed where workspace credentials meet an admin-only route), for a
    request on the victim's data. `every_form` adds more malformed and mismatched forms of the same kinds."""
    victim, attacker = world.victim, world.attacker
    unauthorized, not_admin = frozenset({401}), frozenset({401, 403})
    malformed = {"Basic, not base64": "Basic %%%not-base64%%%",
                 "Basic, no colon": "Basic " + base64.b64encode(victim.key.encode()).decode(),
                 "an unknown scheme": f"Digest {victim.secret}",
                 "the wrong admin token": "Bearer not-the-admin-token"}
    if every_form:
        malformed |= {"Basic, not UTF-8": "Basic " + base64.b64encode(b"\xff\xfe:\xfd").decode(),
                      "Basic, nothing after it": "Basic",
                      "Basic, empty key and secret": "Basic " + base64.b64encode(b":").decode(),
                      "Bearer, nothing after it": "Bearer",
                      "the admin token with a suffix": f"Bearer {ADMIN_TOKEN}x",
                      "the workspace secret as a bearer token": f"Bearer {victim.secret}"}
    found: list[tuple[str, Headers, frozenset[int]]] = [("no credentials", lambda w, m, c: {}, unauthorized)]
    found += [(label, lambda w, m, c, value=value: {"Authorization": value}, unauthorized)
              for label, value in malformed.items()]
    found += [
        ("a wrong secret", lambda w, m, c: basic(victim.key, "wrong-secret"), unauthorized),
        ("another workspace's secret", lambda w, m, c: basic(victim.key, attacker.secret), unauthorized),
        ("an HMAC signature made with a wrong secret", lambda w, m, c: signed(victim.key, "wrong", m, c), unauthorized),
        ("an HMAC signature of another body",
         lambda w, m, c: signed(victim.key, victim.secret, m, Call(c.path, {"other": "body"})), unauthorized),
        ("the key alone, key_only_auth off", lambda w, m, c: {"x-mp-key": victim.key}, unauthorized),
    ]
    if every_form:
        found += [
            ("an empty secret", lambda w, m, c: basic(victim.key, ""), unauthorized),
            ("an unknown key", lambda w, m, c: basic("no-such-key", victim.secret), unauthorized),
            ("an HMAC signature of another Date",
             lambda w, m, c: signed(victim.key, victim.secret, m, c, "Thu, 01 Jan 1970 00:00:00 GMT"), unauthorized),
            ("an HMAC signature of another method",
             lambda w, m, c: signed(victim.key, victim.secret, "PUT" if m == "POST" else "POST", c), unauthorized),
            ("an HMAC signature that is not ASCII",
             lambda w, m, c: {**signed(victim.key, victim.secret, m, c), "x-mp-signature": b"\xe9" * 64}, unauthorized),
            ("an unknown key alone", lambda w, m, c: {"x-mp-key": "no-such-key"}, unauthorized),
        ]
    if case.auth is not Auth.KEY_ONLY_ALLOWED:
        found.append(("a key alone, key_only_auth on", lambda w, m, c: {"x-mp-key": attacker.key}, unauthorized))
    if case.auth is Auth.ADMIN:
        found += [("a workspace's own key + secret", lambda w, m, c: basic(victim.key, victim.secret), not_admin),
                  ("a workspace's HMAC signature", lambda w, m, c: signed(victim.key, victim.secret, m, c), not_admin)]
    elif not case.admin_too:
        found.append(("the admin token, which is no workspace", lambda w, m, c: admin(), unauthorized))
    return found


# Every malformed and mismatched form is tried on one route of each way in (api/auth.py: IDSync's key-only-capable
# check, the secret-only check, admin-or-own, SQL's own admin-or-workspace, admin-only, and the DSR router); the
# other routes get one of each kind, which keeps the module well under a minute.
EVERY_FORM = frozenset({"POST /v1/identify", "POST /v2/events", "GET /platform/v2/workspaces/{workspace_id}",
                        "POST /v1/sql", "POST /platform/v2/workspaces", "POST /v3/requests",
                        "POST /v3/JS/{api_key}/events"})


def attacker_credentials(case: RouteCase) -> list[tuple[str, Headers]]:
    """The attacker's own valid credentials: Basic, and the key alone where the web SDK may use it, else an HMAC
    signature. Each resolves to the same workspace (test_valid_credentials_reach_the_route), so two forms suffice."""
    basic_form: tuple[str, Headers] = ("Basic", lambda w, m, c: basic(w.attacker.key, w.attacker.secret))
    if case.auth is Auth.KEY_ONLY_ALLOWED:
        return [basic_form, ("key alone", lambda w, m, c: {"x-mp-key": w.attacker.key})]
    return [basic_form, ("HMAC", lambda w, m, c: signed(w.attacker.key, w.attacker.secret, m, c))]


def app_routes(app: FastAPI) -> set[str]:
    """Method and path of every route the app serves, its included routers' routes flattened."""
    keys = set()
    for route in iter_route_contexts(app.routes):
        methods = set(route.methods or {"*"})  # a mount or websocket has no methods: it needs an entry too
        if "GET" in methods:
            methods.discard("HEAD")  # Starlette answers HEAD with the GET endpoint
        keys.update(f"{method} {route.path}" for method in methods)
    return keys


# --- the tests -----------------------------------------------------------------------------------------------------
def served(world: World, route: str) -> tuple[str, RouteCase]:
    assert route in world.routes, f"{route} is in ROUTES but the app does not serve it"
    return route.split(" ", 1)[0], ROUTES[route]


def test_the_matrix_covers_every_route_of_the_app(world: World):
    documented = world.http.get("/openapi.json").json()["paths"]  # the running app's own description
    routes = world.routes | {f"{method.upper()} {path}" for path, item in documented.items() for method in item}
    missing = sorted(routes - ROUTES.keys())
    assert not missing, (f"routes without an isolation-matrix entry: {', '.join(missing)}. Add each to ROUTES in "
                         "tests/test_isolation_matrix.py: its auth kind, a valid request on a workspace's own data, "
                         "and the ways it could reach another workspace's data")
    stale = sorted(ROUTES.keys() - routes)
    assert not stale, f"ROUTES lists routes the app no longer has: {', '.join(stale)}"


def test_only_healthz_the_api_description_and_dsr_discovery_are_public():
    assert {route for route, case in ROUTES.items() if case.auth is Auth.PUBLIC} == PUBLIC


def test_the_victim_has_rows_in_every_public_view(world: World):
    """Otherwise an attack on a view could find nothing to leak and prove nothing."""
    empty = [view for view, column in PUBLIC_VIEWS.items()
             if world.server.query(f'SELECT count(*) FROM {view} WHERE "{column}" = ?', world.victim.id) == [(0,)]]
    assert not empty, f"seed() leaves the victim without rows in {empty}: give it some"


@pytest.mark.parametrize("route", ROUTE_KEYS)
def test_valid_credentials_reach_the_route(world: World, route: str):
    """The control for the refusals below: the same kind of request gets through with valid credentials."""
    method, case = served(world, route)
    call = case.request(world.attacker)
    for label, headers in accepted_credentials(case, call, world):
        response = send(world, method, call, headers(world, method, call))
        assert response.status_code == case.ok, f"{route} with {label}: {response.status_code} {response.text[:300]}"
        if case.auth is Auth.PUBLIC:
            assert_reveals_nothing(world, call, response, (world.victim, world.attacker))
        else:
            call = case.request(world.attacker)  # a write may not be valid twice (an alias, an unalias)


@pytest.mark.parametrize("route", ROUTE_KEYS)
def test_missing_malformed_and_wrong_credentials_are_refused_and_change_nothing(world: World, route: str):
    method, case = served(world, route)
    if case.auth is Auth.PUBLIC:
        return  # needs no credentials; test_valid_credentials_reach_the_route checks it reveals nothing
    call = case.request(world.victim)  # refused requests change nothing, so it stays valid for every attempt
    attempts = [(label, call, headers, expect)
                for label, headers, expect in refused_credentials(case, world, route in EVERY_FORM)]
    if world.victim.key in call.path:
        unknown = Call(call.path.replace(world.victim.key, "no-such-key"), call.body, call.params, call.content_type)
        attempts.append(("an unknown key in the path", unknown, lambda w, m, c: {}, frozenset({401})))
    before = current_state(world)
    for label, sent, headers, expect in attempts:
        response = send(world, method, sent, headers(world, method, sent))
        assert response.status_code in expect, f"{route} with {label}: {response.status_code} {response.text[:300]}"
        assert_reveals_nothing(world, sent, response, (world.victim, world.attacker))
    # once per route, not per attempt: a digest of every relation takes ~0.1 s
    settle(world.server)
    after = state(world)
    assert after == before, f"{route} refused every attempt, yet the database changed"
    world.clean_state = (world.server.service.writer.commits, after)


@pytest.mark.parametrize("route", ROUTE_KEYS)
def test_another_workspaces_credentials_cannot_read_or_change_its_data(world: World, route: str):
    method, case = served(world, route)
    if case.auth is Auth.PUBLIC:
        return  # no workspace behind it; test_valid_credentials_reach_the_route checks it reveals nothing
    attacks = admin_only_attacks(case) if case.auth is Auth.ADMIN else case.attacks
    settle(world.server)
    cached, world.victim_seen = world.victim_seen, None
    before = cached[1] if cached is not None and cached[0] == world.victim.writes else victim_state(world)
    tried = []
    for round_, (mode, headers) in enumerate(attacker_credentials(case)):
        built = attacks(world)
        assert built, f"{route} needs its ways at another workspace's data in ROUTES"
        for attack in built:
            if attack.once and round_:
                continue
            response = send(world, method, attack.call, headers(world, method, attack.call))
            where = f"{route}, {attack.what}, attacker's {mode}"
            assert response.status_code in attack.expect, f"{where}: {response.status_code} {response.text[:400]}"
            assert_reveals_nothing(world, attack.call, response, (world.victim,))
            if response.is_success and method != "GET" and attack.call.path != "/v1/sql":  # it may have stored them
                world.planted.update(v for v in world.victim.values if v in attack.call.sent())
            if attack.check is not None:
                attack.check(response)
            tried.append(f"{attack.what} ({mode})")
    settle(world.server)
    after = victim_state(world)
    assert after == before, f"{route}: one of these changed the victim's data: {tried}"
    world.victim_seen = (world.victim.writes, after)


def test_sql_answers_hold_exactly_the_callers_rows(world: World):
    """The filter is not an empty answer for everyone: the attacker counts its own rows, the admin everyone's."""
    for view, column in sorted(PUBLIC_VIEWS.items()):
        query = sql(f"SELECT count(*) FROM {view}")
        own = send(world, "POST", query, basic(world.attacker.key, world.attacker.secret))
        everyone = send(world, "POST", query, admin())
        expected = world.server.query(f'SELECT count(*) FROM {view} WHERE "{column}" = ?', world.attacker.id)[0][0]
        total = world.server.query(f"SELECT count(*) FROM {view}")[0][0]
        assert own.json()["rows"] == [[expected]] and 0 < expected < total, (view, own.text)
        assert everyone.json()["rows"] == [[total]], (view, everyone.text)


ORACLES = [
    "SELECT count(*) FROM identities WHERE CASE WHEN value = '{value}' THEN error('found') ELSE true END",
    "SELECT count(*) FROM identities WHERE (CASE WHEN value = '{value}' THEN 'x' ELSE '1' END)::INTEGER = 1",
    "SELECT max(CASE WHEN value = '{value}' THEN error('found') END) FROM identities",
    "SELECT count(*) FROM profiles WHERE 1 // (mpid <> {mpid})::INTEGER = 1",
    "SELECT count(*) FROM events WHERE mpid = {mpid} AND 1 // (mpid <> {mpid})::INTEGER = 1",
    "SELECT count(*) FROM identities i JOIN profiles p USING (mpid) WHERE 1 // (p.mpid <> {mpid})::INTEGER = 1",
    "SELECT count(*) FROM audience_members WHERE 1 // (mpid <> {mpid})::INTEGER = 1",
]


@pytest.mark.parametrize("oracle", ORACLES)
def test_sql_errors_do_not_tell_whether_another_workspace_holds_a_value(world: World, oracle: str):
    """A query that fails only on a row holding a guessed value must answer the same whether another workspace
    holds it or nobody does: were DuckDB to evaluate the expression before the workspace filter, the mere error
    would confirm the guess, even with its text withheld."""
    credentials = basic(world.attacker.key, world.attacker.secret)
    value = world.victim.other  # only ever searched for by the attacker, so its own rows never hold it
    assert world.server.query("SELECT count(*) FROM identities WHERE value = ? AND scope = ?", value,
                              world.attacker.id) == [(0,)]
    held = send(world, "POST", sql(oracle.format(value=value, mpid=world.victim.known)), credentials)
    nobody = send(world, "POST", sql(oracle.format(value="nobody@example.com", mpid=1)), credentials)
    assert held.status_code == nobody.status_code == 200, (held.text, nobody.text)
    assert held.json()["rows"] == nobody.json()["rows"]
