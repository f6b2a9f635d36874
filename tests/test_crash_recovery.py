"""Crash recovery: every answer the server acknowledged survives a SIGKILL in the middle of a write load.

The real `idmesh serve` runs as a child process over a DuckDB file. Several client threads drive identify and
converting login requests with unique identities; every 200 answer is recorded as identities -> MPID. The
server is killed with SIGKILL while requests are in flight, restarted on the same file, and each recorded
mapping must still hold: `/v1/search` and a repeated identify return the same MPID (group commit answers only
after the write is durable, so nothing acknowledged may be lost).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from live_server import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "crash-admin-token"
THREADS = 8
KILL_AFTER_ACKS = 300          # acknowledged answers before each SIGKILL
ROUNDS = 2                     # load, SIGKILL, restart and check; twice, the second on the recovered file
MAX_REQUESTS_PER_THREAD = 2000  # bound on the load, whatever happens
LOAD_DEADLINE_S = 90


class Server:
    """`python -m api.cli serve` on a loopback port, its output in a log file."""

    def __init__(self, db_path: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, IDMESH_ADMIN_TOKEN=ADMIN_TOKEN)
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--db", str(db_path)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"idmesh serve exited with {self.process.returncode}")
                try:
                    if http.get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("idmesh serve did not become healthy")

    def sigkill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.kill()  # this child only, by its pid
                self.process.wait(timeout=30)
        finally:
            self.log.close()


@dataclass
class Answer:
    operation: str
    identities: dict[str, str]
    mpid: str
    previous_mpid: str | None = None


@dataclass
class Load:
    """Shared by the client threads; `lock` guards every field."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: list[Answer] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    in_flight: int = 0
    in_flight_at_kill: int = 0
    sent: int = 0
    login_sent: set[str] = field(default_factory=set)  # devices whose login was sent (answered or not)
    killed: threading.Event = field(default_factory=threading.Event)


def drive(base_url: str, auth: tuple[str, str], tag: str, load: Load, deadline: float) -> None:
    """Identify a fresh device, and for every third device log in with a fresh customer id (a conversion)."""

    def post(operation: str, identities: dict[str, str], previous_mpid: str | None = None) -> str | None:
        body: dict[str, Any] = {"environment": "production", "known_identities": identities,
                                "request_id": f"{tag}-{operation}-{identities['ios_idfv']}"}
        if previous_mpid is not None:
            body["previous_mpid"] = previous_mpid
        with load.lock:
            load.in_flight += 1
            load.sent += 1
        try:
            response = http.post(f"/v1/{operation}", json=body)
        except httpx.TransportError as exc:
            if not load.killed.is_set():
                with load.lock:
                    load.unexpected.append(f"{operation} {identities}: {exc!r} before the kill")
            return None
        finally:
            with load.lock:
                load.in_flight -= 1
        if response.status_code != 200:
            with load.lock:
                load.unexpected.append(f"{operation} {identities}: {response.status_code} {response.text}")
            return None
        mpid = response.json()["mpid"]
        with load.lock:
            load.acknowledged.append(Answer(operation, identities, mpid, previous_mpid))
        return mpid

    with httpx.Client(base_url=base_url, auth=auth, timeout=15) as http:
        for i in range(MAX_REQUESTS_PER_THREAD):
            if load.killed.is_set() or time.monotonic() > deadline:
                return
            device = {"ios_idfv": f"crash-dev-{tag}-{i}"}
            anonymous = post("identify", device)
            if anonymous is None:
                if load.killed.is_set():
                    return
                continue
            if i % 3 == 0:
                with load.lock:
                    load.login_sent.add(device["ios_idfv"])
                post("login", dict(device, customerid=f"crash-cust-{tag}-{i}"), anonymous)


def load_then_sigkill(server: Server, auth: tuple[str, str], round_no: int) -> Load:
    """Drive the load until KILL_AFTER_ACKS answers came back, then SIGKILL the server with requests in flight."""
    load = Load()
    deadline = time.monotonic() + LOAD_DEADLINE_S
    threads = [threading.Thread(target=drive, args=(server.base_url, auth, f"r{round_no}t{n}", load, deadline),
                                daemon=True) for n in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline:
            with load.lock:
                acked, in_flight = len(load.acknowledged), load.in_flight
            if acked >= KILL_AFTER_ACKS and in_flight > 0:
                break
            assert not load.unexpected, load.unexpected[:5]
            time.sleep(0.002)
        with load.lock:
            load.in_flight_at_kill = load.in_flight
            load.killed.set()
        server.sigkill()
    finally:
        load.killed.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client thread did not stop"
    assert server.process.returncode == -signal.SIGKILL
    assert not load.unexpected, load.unexpected[:5]
    assert len(load.acknowledged) >= KILL_AFTER_ACKS, f"only {len(load.acknowledged)} answers before the deadline"
    assert load.in_flight_at_kill > 0, "no request was in flight at the kill"
    # Conversion keeps the anonymous MPID on the first login (B§9), so each device maps to one MPID.
    by_device = {a.identities["ios_idfv"]: a.mpid for a in load.acknowledged if a.operation == "identify"}
    for answer in load.acknowledged:
        if answer.operation == "login":
            assert answer.mpid == answer.previous_mpid == by_device[answer.identities["ios_idfv"]], answer
    assert len(set(by_device.values())) == len(by_device), "two fresh devices were given the same MPID"
    return load


def check_mappings(server: Server, auth: tuple[str, str], acknowledged: list[Answer], login_sent: set[str]) -> None:
    """Every acknowledged identities -> MPID mapping holds on the restarted server."""
    lost = []
    with httpx.Client(base_url=server.base_url, auth=auth, timeout=15) as http:
        for answer in acknowledged:
            body = {"environment": "production", "known_identities": answer.identities}
            searched = http.post("/v1/search", json=body)
            if searched.status_code != 200 or searched.json()["mpid"] != answer.mpid:
                lost.append(f"search {answer.identities}: {searched.status_code} {searched.text} "
                            f"(acknowledged {answer.mpid})")
            for key, value in answer.identities.items():  # each identity alone maps to the same MPID
                alone = http.post("/v1/search", json={"known_identities": {key: value}})
                if alone.status_code != 200 or alone.json()["mpid"] != answer.mpid:
                    lost.append(f"search {key}={value}: {alone.status_code} {alone.text} "
                                f"(acknowledged {answer.mpid})")
            # A device that logged in (even unanswered) holds a login id now: an identify without it is gated
            # away from that profile (G-UD example 3), so only the others repeat their identify.
            if answer.operation == "login" or answer.identities["ios_idfv"] not in login_sent:
                repeated = http.post(f"/v1/{answer.operation}", json=body)
                if repeated.status_code != 200 or repeated.json()["mpid"] != answer.mpid:
                    lost.append(f"repeat {answer.operation} {answer.identities}: {repeated.status_code} "
                                f"{repeated.text} (acknowledged {answer.mpid})")
            if answer.operation == "login":
                again = http.post("/v1/identify", json=body)
                if again.status_code != 200 or again.json()["mpid"] != answer.mpid or \
                        again.json()["is_logged_in"] is not True:
                    lost.append(f"identify {answer.identities}: {again.status_code} {again.text}")
    assert not lost, f"{len(lost)} acknowledged mappings lost after SIGKILL, e.g. {lost[:5]}"


def profile_count(server: Server, workspace_id: str) -> int:
    with httpx.Client(base_url=server.base_url, timeout=15) as http:
        hubs = http.get(f"/platform/v2/workspaces/{workspace_id}/identity/hubs",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert hubs.status_code == 200, hubs.text
    return hubs.json()["profiles"]


def test_acknowledged_answers_survive_sigkill(tmp_path: Path) -> None:
    """Two rounds: load + SIGKILL + restart + check, then the same again on the recovered file."""
    db_path = tmp_path / "db.duckdb"
    log_path = tmp_path / "server.log"
    servers = [Server(db_path, log_path)]
    try:
        servers[0].wait_healthy()
        with httpx.Client(base_url=servers[0].base_url, timeout=15) as http:
            created = http.post("/platform/v2/workspaces", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                json={"name": "crash", "settings": {"strategy": "profile_conversion"}})
        assert created.status_code == 201, created.text
        workspace = created.json()
        auth = (workspace["api_key"], workspace["api_secret"])

        acknowledged: list[Answer] = []
        login_sent: set[str] = set()
        for round_no in range(ROUNDS):
            load = load_then_sigkill(servers[-1], auth, round_no)
            acknowledged += load.acknowledged
            login_sent |= load.login_sent
            servers.append(Server(db_path, log_path))
            servers[-1].wait_healthy()
            check_mappings(servers[-1], auth, acknowledged, login_sent)
            acknowledged_profiles = len({a.mpid for a in acknowledged})
            assert profile_count(servers[-1], workspace["id"]) >= acknowledged_profiles
        log = log_path.read_text(errors="replace")
        assert "Traceback" not in log and "commit failed" not in log, log[-3000:]
    finally:
        for server in servers:
            server.stop()
