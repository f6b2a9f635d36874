"""The `idmesh` command line: `idmesh serve`, `idmesh sql`, `idmesh import`, `idmesh sync`, `idmesh sink`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import duckdb

from api.import_cli import add_import_command, import_command
from api.sink_cli import add_sink_command, sink_command
from api.sql_cli import add_sql_command, sql_command
from api.sync_cli import add_sync_command
from engine.idsync import IdSyncService
from engine.store import unwritable_reason

DEFAULT_DB = str(Path.home() / ".local" / "share" / "idmesh" / "idmesh.duckdb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idmesh", description="identity resolution and audience engine")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--db", default=os.environ.get("IDMESH_DB", DEFAULT_DB), help="DuckDB file")
    serve.add_argument("--config", help="JSON file: workspaces to create at start-up (see README)")
    serve.add_argument("--tls-cert", help="PEM certificate; serve HTTPS (the web SDK aliases over https)")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    add_sql_command(commands)
    add_import_command(commands)
    add_sync_command(commands)
    add_sink_command(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "import":
        return import_command(args)
    if args.command == "sql":
        return sql_command(args)
    if args.command == "sync":
        return _sync_command(args)
    if args.command == "sink":
        return sink_command(args)
    return 2


def _sync_command(args: argparse.Namespace) -> int:
    """`idmesh sync` (api/sync_cli.py) on the database file, which no server may hold open."""
    from api.sync_cli import sync_command

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    db = args.db or os.environ.get("IDMESH_DB", DEFAULT_DB)
    try:
        service = IdSyncService.open(db)
    except (OSError, duckdb.IOException) as exc:
        raise SystemExit(f"idmesh sync: cannot open {db}: {str(exc).strip()} (a running server delivers by itself; "
                         "stop it to sync from the command line)") from None
    try:
        return sync_command(args, service)
    finally:
        service.close()


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("idmesh: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    admin_token = os.environ.get("IDMESH_ADMIN_TOKEN")
    generated = admin_token is None
    admin_token = admin_token or secrets.token_urlsafe(24)
    service = _open_service(args.db)
    config = _read_config(args.config) if args.config else {}
    created = asyncio.run(_ensure_workspaces(service, config.get("workspaces", [])))
    scheme = "https" if args.tls_cert else "http"
    print(f"idmesh serving http API at {scheme}://{args.host}:{args.port}  (database {args.db})", flush=True)
    if generated:
        print(f"admin bearer token (set IDMESH_ADMIN_TOKEN to choose one): {admin_token}", flush=True)
    for workspace in created:
        print(f"workspace {workspace['name']!r}: id={workspace['id']} api_key={workspace['api_key']} "
              f"api_secret={workspace['api_secret']}", flush=True)
    # imported here: FastAPI and uvicorn cost a second of start-up that `idmesh sql` and `idmesh import` never need
    import uvicorn

    from api.app import create_app
    from api.config_audiences import ensure_audiences

    app = create_app(service, admin_token)
    for line in asyncio.run(ensure_audiences(app, config.get("workspaces", []))):
        print(line, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                    access_log=False, log_level="warning", loop="uvloop", http="httptools",
                    timeout_graceful_shutdown=5)  # an idle TLS keep-alive otherwise holds SIGTERM for 30 s
    finally:
        service.close()  # the app's lifespan closed it already, unless the app never started (a port in use)
    return 0


def _open_service(db: str) -> IdSyncService:
    """Open the database, or exit (status 1) with one line saying why. A server that cannot write would look
    healthy and answer every write with 503, so a read-only file or directory stops start-up instead."""
    try:
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"idmesh: cannot create the directory for --db {db}: {exc.strerror}") from None
    problem = unwritable_reason(db)
    if problem is not None:
        raise SystemExit(f"idmesh: cannot serve {db}: {problem}")
    try:
        return IdSyncService.open(db)
    except (OSError, duckdb.IOException, duckdb.TransactionException, duckdb.FatalException) as exc:
        # disk full or an I/O error while replaying the WAL or folding the journal left by the last run
        raise SystemExit(f"idmesh: cannot open the database {db}: {str(exc).strip()}") from None


def _read_config(path: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"idmesh: cannot read --config {path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("workspaces", []), list):
        raise SystemExit(f"idmesh: --config {path} must be an object with a 'workspaces' list")
    return config


async def _ensure_workspaces(service: IdSyncService, wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Create the configured workspaces that do not exist yet (matched by api_key); report the ones made
    from the config, whose secrets the operator chose, so a demo can print them."""
    reported = []
    for entry in wanted:
        existing = service.workspaces.by_api_key(entry.get("api_key", ""))
        if existing is None:
            created, batch = service.workspaces.plan_create(entry.get("name"), entry.get("settings"),
                                                            api_key=entry.get("api_key"),
                                                            api_secret=entry.get("api_secret"))
            await service.commit(batch)
            service.workspaces.remember(created.workspace)
            existing = created.workspace
        if entry.get("api_secret"):
            reported.append({"name": existing.name, "id": existing.id, "api_key": existing.api_key,
                             "api_secret": entry["api_secret"]})
    return reported


if __name__ == "__main__":
    raise SystemExit(main())
