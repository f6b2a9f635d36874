"""Browser compatibility test: the official mParticle web SDK against a real `idmesh serve`.

Headless Debian Chromium (driven by the PyPI package `playwright`, using /usr/bin/chromium; no browser is
ever downloaded) loads tests/browser/index.html from a static server on 127.0.0.1. The page loads
@mparticle/web-sdk 2.68.0 from tests/browser/node_modules and points it at idmesh, which runs over TLS
with a throwaway certificate because the SDK's alias call is always https (spec A1).

Prerequisites come from `.ci/install-browser.sh`. Without them the module is skipped, except when the
environment variable CI is set: there a missing prerequisite is a failure.

Debug hook: IDMESH_BIN=/path/to/executable replaces the `idmesh` command (same `serve` arguments).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BROWSER_DIR = REPO / "tests" / "browser"
SDK_BUNDLE = BROWSER_DIR / "node_modules" / "@mparticle" / "web-sdk" / "dist" / "mparticle.js"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--ignore-certificate-errors",
]
ADMIN_TOKEN = "web-sdk-test-admin-" + uuid.uuid4().hex
HEALTH_TIMEOUT_S = 30.0
CALL_TIMEOUT_MS = 15_000


def _missing_prerequisites() -> list[str]:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (run .ci/install-browser.sh)")
    if not SDK_BUNDLE.exists():
        missing.append(f"{SDK_BUNDLE.relative_to(REPO)} (run .ci/install-browser.sh)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the PyPI package playwright (a dev dependency)")
    return missing


_MISSING = _missing_prerequisites()
_IN_CI = bool(os.environ.get("CI"))

pytestmark = [
    pytest.mark.skipif(
        bool(_MISSING) and not _IN_CI,
        reason="browser prerequisites missing: " + ", ".join(_MISSING),
    ),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def prerequisites() -> None:
    # Only reached when not skipped: in CI a missing prerequisite must fail, never skip.
    if _MISSING:
        pytest.fail("browser prerequisites missing in CI: " + ", ".join(_MISSING))


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _idmesh_command() -> list[str]:
    override = os.environ.get("IDMESH_BIN")
    if override:
        return [override]
    sibling = Path(sys.executable).with_name("idmesh")
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main())"]


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-limit:]


class IdmeshServer:
    def __init__(self, port: int, log_path: Path, proc: subprocess.Popen, db_path: Path):
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.base = f"https://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc = proc
        self.db_path = db_path

    def stop(self) -> None:
        """SIGTERM: uvicorn shuts down and `idmesh serve` closes its DuckDB file. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def query(self, sql: str, *params) -> list[tuple]:
        """Reads the server's database once it has stopped: DuckDB lets one process at a time open the file,
        and the running server holds it."""
        import duckdb

        assert self.proc.poll() is not None, "stop() the server before reading its database"
        with duckdb.connect(str(self.db_path), read_only=True) as connection:
            return connection.execute(sql, list(params)).fetchall()

    def client(self):
        import httpx

        return httpx.Client(base_url=self.base, verify=False, timeout=10.0)

    def create_workspace(self, strategy: str) -> dict:
        body = {"name": "web", "settings": {"strategy": strategy, "key_only_auth": True}}
        with self.client() as c:
            r = c.post(
                "/platform/v2/workspaces",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                json=body,
            )
        assert r.status_code == 201, f"POST /platform/v2/workspaces {body} -> {r.status_code} {r.text}"
        ws = r.json()
        for field in ("id", "api_key", "api_secret"):
            assert ws.get(field), f"workspace answer lacks {field!r}: {ws}"
        return ws

    def search(self, ws: dict, known_identities: dict):
        token = base64.b64encode(f"{ws['api_key']}:{ws['api_secret']}".encode()).decode()
        body = {"environment": "development", "known_identities": known_identities}
        with self.client() as c:
            return c.post("/v1/search", headers={"Authorization": f"Basic {token}"}, json=body)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@contextlib.contextmanager
def _serve_idmesh(directory: Path, tls_files: tuple[Path, Path]):
    """Runs `idmesh serve` over TLS on a fresh DuckDB file in `directory` until the block ends."""
    cert_path, key_path = tls_files
    port = _free_port()
    db_path = directory / "db.duckdb"
    cmd = _idmesh_command() + [
        "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--db", str(db_path),
        "--tls-cert", str(cert_path),
        "--tls-key", str(key_path),
    ]  # fmt: skip
    env = dict(os.environ, IDMESH_ADMIN_TOKEN=ADMIN_TOKEN)
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = IdmeshServer(port, log_path, proc, db_path)
        try:
            yield _wait_healthy(server, cmd)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def idmesh_server(prerequisites, tls_files, tmp_path_factory):
    with _serve_idmesh(tmp_path_factory.mktemp("idmesh"), tls_files) as server:
        yield server


@pytest.fixture
def own_idmesh_server(prerequisites, tls_files, tmp_path):
    """A server for one test, which may stop it to read its database."""
    with _serve_idmesh(tmp_path, tls_files) as server:
        yield server


def _wait_healthy(server: IdmeshServer, cmd: list[str]) -> IdmeshServer:
    import httpx

    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    last = "no answer"
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"idmesh serve exited with {server.proc.returncode}: {cmd}\n{_tail(server.log_path)}")
        try:
            r = httpx.get(f"{server.base}/healthz", verify=False, timeout=2.0)
            if r.status_code == 200:
                return server
            last = f"HTTP {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            pytest.fail(f"GET /healthz not 200 within {HEALTH_TIMEOUT_S}s ({last}): {cmd}\n{_tail(server.log_path)}")
        time.sleep(0.1)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@pytest.fixture(scope="module")
def static_server(prerequisites):
    handler = functools.partial(_QuietHandler, directory=str(BROWSER_DIR))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="web-sdk-static", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser(prerequisites):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        # Playwright starts Chromium with a fresh temporary --user-data-dir and removes it on close;
        # every test then gets its own new browser context (empty storage).
        b = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            chromium_sandbox=False,
            args=CHROMIUM_ARGS,
            timeout=60_000,
        )
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


class Harness:
    """The page plus what it saw; wraps window.idmesh.* (tests/browser/harness.js)."""

    def __init__(self, page, events: list[str], requests: list[dict]):
        self.page = page
        self.events = events  # human-readable log: requests to idmesh, responses, console
        self.requests = requests  # requests to idmesh: method, path, headers, body, status (None = no answer)

    def requests_to(self, path_fragment: str) -> list[dict]:
        """Requests whose path contains path_fragment, e.g. "/events" for the SDK's batch uploads."""
        return [r for r in self.requests if path_fragment in r["path"]]

    def _call(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def ready(self) -> dict:
        return self._call(
            """(ms) => Promise.race([window.idmesh.ready, new Promise((_, reject) =>
                   setTimeout(() => reject(new Error('start-up identify not reported in ' + ms + ' ms')), ms))])""",
            CALL_TIMEOUT_MS,
        )

    def identify(self, identities: dict | None = None) -> dict:
        return self._call("(ids) => window.idmesh.identify(ids)", identities or {})

    def login(self, identities: dict) -> dict:
        return self._call("(ids) => window.idmesh.login(ids)", identities)

    def modify(self, new_email: str) -> dict:
        return self._call("(email) => window.idmesh.modify(email)", new_email)

    def logout(self) -> dict:
        return self._call("() => window.idmesh.logout()")

    def alias(self, source_mpid: str, destination_mpid: str) -> dict:
        return self._call("([s, d]) => window.idmesh.alias(s, d)", [source_mpid, destination_mpid])

    def current_user(self) -> dict:
        return self._call("() => window.idmesh.currentUser()")

    def close(self) -> None:
        """Closes the page's browser context and with it its keep-alive connections to idmesh: over TLS an
        idle one holds `idmesh serve` on SIGTERM for uvloop's 30 s SSL shutdown timeout."""
        self.page.context.close()

    def log_event(self, name: str, attributes: dict) -> None:
        self._call("([n, a]) => window.idmesh.logEvent(n, a)", [name, attributes])

    def log_page_view(self, name: str, attributes: dict) -> None:
        self._call("([n, a]) => window.idmesh.logPageView(n, a)", [name, attributes])

    def set_user_attribute(self, name: str, value) -> dict:
        """Sets it on the current user (a list through setUserAttributeList); returns all its attributes."""
        return self._call("([n, v]) => window.idmesh.setUserAttribute(n, v)", [name, value])

    def upload_and_wait(self, marker: str) -> dict:
        """mParticle.upload(), then waits until idmesh has answered the events upload whose body contains
        `marker`; returns {status, body (the batch sent), answer}. Playwright's default timeout bounds the wait."""

        def is_upload(response) -> bool:
            request = response.request
            return request.method == "POST" and request.url.endswith("/events") and marker in (request.post_data or "")

        with self.page.expect_response(is_upload) as info:
            self._call("() => window.idmesh.upload()")
        response = info.value
        return {"status": response.status, "body": json.loads(response.request.post_data), "answer": response.json()}


@pytest.fixture
def open_harness(browser, static_server, idmesh_server):
    """open_harness(api_key, identify_request=None, server=None, config=None) -> Harness with the SDK
    initialised against idmesh (the module's server unless `server` is given).

    identify_request (user identities) is passed as the SDK's `identifyRequest` init option; config holds
    further init options (e.g. `flags`). Every harness gets its own browser context (empty storage).
    Diagnostics are printed on teardown."""
    from playwright.sync_api import Error as PlaywrightError

    contexts = []
    harnesses: list[Harness] = []
    servers: list[IdmeshServer] = []

    def _open(api_key: str, identify_request: dict | None = None, server: IdmeshServer | None = None,
              config: dict | None = None) -> Harness:
        server = server or idmesh_server
        servers.append(server)
        context = browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(CALL_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        events: list[str] = []
        requests: list[dict] = []
        by_request: dict = {}  # keyed by the Request object itself
        api_prefix = server.base

        def on_request(req):
            if req.url.startswith(api_prefix):
                record = {
                    "method": req.method,
                    "path": req.url[len(api_prefix) :],
                    "headers": dict(req.headers),
                    "body": req.post_data,
                    "status": None,
                }
                requests.append(record)
                by_request[req] = record
                events.append(f"> {req.method} {req.url} {json.dumps(req.headers)} {req.post_data or ''}"[:1500])

        def on_response(resp):
            if resp.url.startswith(api_prefix):
                record = by_request.get(resp.request)
                if record is not None:
                    record["status"] = resp.status
                events.append(f"< {resp.status} {resp.request.method} {resp.url} {json.dumps(resp.headers)}")

        def on_failed(req):
            events.append(f"! FAILED {req.method} {req.url}: {req.failure}")

        page.on("request", on_request)
        page.on("response", on_response)
        page.on("requestfailed", on_failed)
        page.on("console", lambda msg: events.append(f"console.{msg.type}: {msg.text}"[:1500]))
        page.on("pageerror", lambda exc: events.append(f"pageerror: {exc}"))
        url = f"{static_server}/index.html?key={api_key}&api={server.host}"
        start_config = dict(config or {})
        if identify_request is not None:
            start_config["identifyRequest"] = {"userIdentities": identify_request}
        if start_config:
            url += "&autostart=0"
        page.goto(url, wait_until="load", timeout=CALL_TIMEOUT_MS)
        if start_config:
            page.evaluate("(config) => { window.idmesh.start(config); }", start_config)
        h = Harness(page, events, requests)
        harnesses.append(h)
        return h

    try:
        yield _open
    finally:
        # Printed output is shown by pytest only when the test fails.
        for h in harnesses:
            print("---- browser events (requests to idmesh, console) ----")
            print("\n".join(h.events))
        for server in dict.fromkeys(servers or [idmesh_server]):
            print(f"---- idmesh serve log (tail) {server.base} ----")
            print(_tail(server.log_path))
        for context in contexts:
            with contextlib.suppress(PlaywrightError):
                context.close()


def _ok(result: dict, what: str) -> dict:
    assert result["httpCode"] == 200, f"{what}: SDK callback reported {result}"
    assert result["mpid"] not in (None, "", "0"), f"{what}: no MPID in {result}"
    return result


def _unique() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- tests


def test_profile_conversion_identity_flow(open_harness, idmesh_server):
    ws = idmesh_server.create_workspace("profile_conversion")
    h = open_harness(ws["api_key"])
    tag = _unique()
    email = f"web-{tag}@example.com"
    new_email = f"new-web-{tag}@example.com"
    customerid = f"webcid-{tag}"

    started = _ok(h.ready(), "start-up identify")
    mpid_a = started["mpid"]
    assert started["isLoggedIn"] is False, started

    login = _ok(h.login({"email": email, "customerid": customerid}), "login")
    assert login["mpid"] == mpid_a, f"conversion login must keep the anonymous MPID {mpid_a}: {login}"
    assert login["isLoggedIn"] is True, login

    modified = h.modify(new_email)
    assert modified["httpCode"] == 200, f"modify: {modified}"
    assert h.current_user()["mpid"] == mpid_a
    assert h.current_user()["identities"].get("email") == new_email

    logout = _ok(h.logout(), "logout")
    mpid_b = logout["mpid"]
    assert mpid_b != mpid_a, f"logout must not return the known profile {mpid_a}: {logout}"
    assert logout["isLoggedIn"] is False, logout

    again = _ok(h.login({"email": new_email, "customerid": customerid}), "second login")
    assert again["mpid"] == mpid_a, f"returning login must give {mpid_a}: {again}"
    assert again["isLoggedIn"] is True, again

    aliased = h.alias(mpid_b, mpid_a)
    assert aliased["httpCode"] in (200, 202), f"alias {mpid_b} -> {mpid_a}: {aliased}"
    assert aliased["request"]["sourceMpid"] == mpid_b
    assert aliased["request"]["destinationMpid"] == mpid_a
    sent = h.requests_to(f"/v1/identity/{ws['api_key']}/Alias")
    assert sent and sent[-1]["status"] in (200, 202), sent

    for known_identities in ({"customerid": customerid}, {"email": new_email}):
        r = idmesh_server.search(ws, known_identities)
        assert r.status_code == 200, f"POST /v1/search {known_identities} -> {r.status_code} {r.text}"
        assert str(r.json()["mpid"]) == mpid_a, f"search {known_identities}: {r.text}"


def test_profile_link_login_creates_new_profile(open_harness, idmesh_server):
    ws = idmesh_server.create_workspace("profile_link")
    h = open_harness(ws["api_key"])
    tag = _unique()
    customerid = f"linkcid-{tag}"

    started = _ok(h.ready(), "start-up identify")
    anon = started["mpid"]
    assert started["isLoggedIn"] is False, started

    login = _ok(h.login({"email": f"link-{tag}@example.com", "customerid": customerid}), "login")
    known = login["mpid"]
    assert known != anon, f"profile_link login must create a new MPID, got the anonymous {anon}"
    assert login["isLoggedIn"] is True, login

    logout = _ok(h.logout(), "logout")
    assert logout["mpid"] not in (anon, known), f"profile_link logout must create a new profile: {logout}"
    assert logout["isLoggedIn"] is False, logout

    r = idmesh_server.search(ws, {"customerid": customerid})
    assert r.status_code == 200, f"POST /v1/search -> {r.status_code} {r.text}"
    assert str(r.json()["mpid"]) == known, r.text


def test_second_browser_identify_with_login_ids_returns_known_profile(open_harness, idmesh_server):
    # A second browser (new storage, new device stamp) whose app passes identifyRequest at init: the
    # start-up identify carries login IDs and resolves like login to the known profile (spec A2.4).
    ws = idmesh_server.create_workspace("profile_conversion")
    tag = _unique()
    ids = {"email": f"second-{tag}@example.com", "customerid": f"secondcid-{tag}"}
    first = open_harness(ws["api_key"])
    anon = _ok(first.ready(), "start-up identify")["mpid"]
    known = _ok(first.login(ids), "login")
    assert known["mpid"] == anon and known["isLoggedIn"] is True, known

    second = open_harness(ws["api_key"], identify_request=ids)
    restored = _ok(second.ready(), "start-up identify with login IDs")
    assert restored["mpid"] == anon, restored
    assert restored["isLoggedIn"] is True, restored
    sent = json.loads(second.requests_to("/v1/identify")[0]["body"])
    assert sent["known_identities"]["customerid"] == ids["customerid"], sent


def test_unknown_api_key_reports_http_status(open_harness):
    # Error answers must carry CORS headers too. The SDK reports any status other than 200/202/400 as
    # httpCode -1 with body "Received HTTP Code of <status>"; a CORS failure would say "Failed to fetch".
    h = open_harness("idm_no_such_key_" + _unique())
    started = h.ready()
    assert started["httpCode"] == -1 and "401" in str(started["body"]), started
    assert [r["status"] for r in h.requests_to("/v1/identify")] == [401], h.requests


def test_events_from_the_page_are_stored_for_the_current_mpid(open_harness, own_idmesh_server):
    # A server of its own: the test stops it to read the DuckDB file, which the running server holds.
    server = own_idmesh_server
    ws = server.create_workspace("profile_link")
    # Batching on, with an interval no test reaches: only mParticle.upload() sends the events logged below.
    h = open_harness(ws["api_key"], server=server, config={"flags": {"eventBatchingIntervalMillis": "3600000"}})
    tag = _unique()
    customerid = f"eventscid-{tag}"

    anon = _ok(h.ready(), "start-up identify")["mpid"]
    known = _ok(h.login({"email": f"events-{tag}@example.com", "customerid": customerid}), "login")["mpid"]
    assert known != anon, "profile_link login must move the page to a new profile"

    h.log_event(f"Web Purchase {tag}", {"sku": "sku-1", "coupon": "SPRING"})
    h.log_page_view(f"Checkout {tag}", {"step": "payment"})
    h.set_user_attribute("plan", "pro")
    attributes = h.set_user_attribute("colours", ["red", "blue"])
    assert attributes == {"plan": "pro", "colours": ["red", "blue"]}, attributes
    sent = h.upload_and_wait(f"Web Purchase {tag}")

    assert sent["status"] == 202, sent
    assert sent["answer"]["status"] == "accepted" and sent["answer"]["mpid"] == known, sent
    assert sent["body"]["mpid"] == known, sent["body"]
    assert [e["event_type"] for e in sent["body"]["events"]] == [
        "custom_event", "screen_view", "user_attribute_change", "user_attribute_change"]
    answered = [r["status"] for r in h.requests_to(f"/v3/JS/{ws['api_key']}/events") if r["status"] is not None]
    assert answered and set(answered) == {202}, h.requests
    r = server.search(ws, {"customerid": customerid})
    assert r.status_code == 200 and str(r.json()["mpid"]) == known, f"POST /v1/search -> {r.status_code} {r.text}"

    h.close()
    server.stop()
    _assert_page_data_stored(server, ws["id"], int(known), int(anon), tag)


def _assert_page_data_stored(server: IdmeshServer, workspace_id: str, known: int, anon: int, tag: str) -> None:
    """What the stopped server's database holds after the page's upload: the events and user attributes on
    the logged-in profile, nothing of them on the anonymous one, every batch from the web SDK path."""
    events = server.query(
        """SELECT event_type, event_name, custom_event_type, custom_attributes FROM events
           WHERE workspace_id = ? AND mpid = ? AND event_type IN ('custom_event', 'screen_view')
           ORDER BY timestamp_ms, event_index""",
        workspace_id, known,
    )  # fmt: skip
    assert [(t, n, c, json.loads(a)) for t, n, c, a in events] == [
        ("custom_event", f"Web Purchase {tag}", "other", {"sku": "sku-1", "coupon": "SPRING"}),
        ("screen_view", f"Checkout {tag}", None, {"step": "payment"}),
    ]
    stored = server.query("SELECT name, value FROM user_attributes WHERE workspace_id = ? AND mpid = ?",
                          workspace_id, known)
    assert {name: json.loads(value) for name, value in stored} == {"plan": "pro", "colours": ["red", "blue"]}
    changes = server.query(
        """SELECT data->>'user_attribute_name' FROM events WHERE workspace_id = ? AND mpid = ?
           AND event_type = 'user_attribute_change' ORDER BY timestamp_ms, event_index""",
        workspace_id, known,
    )  # fmt: skip
    assert changes == [("plan",), ("colours",)]
    on_anon = server.query("SELECT count(*) FROM events WHERE mpid = ? AND event_name LIKE ?", anon, f"%{tag}%")
    assert on_anon == [(0,)]
    sources = server.query("SELECT DISTINCT source, environment FROM batches WHERE workspace_id = ?", workspace_id)
    assert sources == [("web", "development")]
