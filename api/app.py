"""The FastAPI application: routers, error bodies, CORS for browsers, gzip request bodies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response

from api import (
    audience_routes,
    ca_routes,
    connection_routes,
    dsr_routes,
    events_routes,
    idsync_routes,
    import_routes,
    platform_routes,
    profile_routes,
    sql_routes,
)
from api.background import start_background_jobs
from api.body import add_body_schemas
from api.errors import install_error_handlers
from api.gzip_body import GzipRequestMiddleware
from api.ratelimit import TokenBuckets
from audiences.connections import ConnectionRegistry
from audiences.delivery import DIFF_SECONDS, FLUSH_POLL_SECONDS, DeliveryService, server_outputs
from audiences.registry import AudienceRegistry
from audiences.upkeep import STANDARD_POLL_SECONDS, TIME_DRIVEN_SECONDS, AudienceUpkeep
from engine.ca_engine import CalculatedAttributeEngine
from engine.ca_registry import CalculatedAttributeRegistry
from engine.dsr import DsrService
from engine.idsync import IdSyncService
from engine.ingest import EventIngestor

CA_TIME_POLL_SECONDS = 60


def create_app(service: IdSyncService, admin_token: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler = start_background_jobs(service, app.state.dsr)
        # values that time alone changes (calculated attribute windows, future-stamped events)
        scheduler.add_job(ca_routes.refresh_time_driven, "interval", seconds=CA_TIME_POLL_SECONDS, args=[app],
                          id="calculated-attributes-time", max_instances=1, coalesce=True)
        # standard audiences when due; real-time ones whose time windows move with the clock (audiences/upkeep.py)
        scheduler.add_job(upkeep.evaluate_due_standard, "interval", seconds=STANDARD_POLL_SECONDS,
                          id="audiences-standard", max_instances=1, coalesce=True)
        scheduler.add_job(upkeep.evaluate_time_driven, "interval", seconds=TIME_DRIVEN_SECONDS,
                          id="audiences-time", max_instances=1, coalesce=True)
        upkeep.evaluate_after_start(ca_routes.recompute_after_start(app))
        # delivery (audiences/delivery.py): every connection diffed on schedule (identity and consent changes), new
        # and changed ones at the next tick, due flushes and retries started each tick, one task per connection
        delivery.start()
        # a tick every few seconds and a request per delivered batch would flood the INFO log
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        scheduler.add_job(delivery.diff, "interval", seconds=DIFF_SECONDS, id="delivery-diff", max_instances=1,
                          coalesce=True)
        scheduler.add_job(delivery.tick, "interval", seconds=FLUSH_POLL_SECONDS, id="delivery-flush",
                          max_instances=1, coalesce=True)
        try:
            yield
        finally:
            scheduler.shutdown(wait=False)
            await delivery.aclose()  # flushes in flight stop; what they sent unacknowledged is sent again next start
            # uvicorn re-raises SIGTERM once the lifespan has ended, which kills the process before `idmesh serve`
            # can close the service: close it here, so DuckDB checkpoints and the next start replays no WAL. Queued
            # upkeep runs first; the gate waits for computations the scheduler left running (DuckDB refuses to
            # close a connection under a busy cursor).
            await ca_routes.background_idle(app.state.background_tasks)
            async with service.computation_gate.exclusive():
                service.close()

    app = FastAPI(title="idmesh", version="0.1.0", lifespan=lifespan,
                  description="Identity resolution speaking mParticle's IDSync wire format")
    app.state.service = service
    app.state.ingestor = EventIngestor(service)
    app.state.dsr = DsrService.open(service)
    app.state.calculated = CalculatedAttributeRegistry()
    app.state.calculated.load(service.connection)
    app.state.calculation = CalculatedAttributeEngine(service.connection, service.computation_gate)
    app.state.audiences = AudienceRegistry(lambda ws, ca_id: any(ca.id == ca_id for ca in app.state.calculated.active(ws)))
    app.state.audiences.load(service.connection)
    app.state.audience_changes = asyncio.Lock()  # one audience definition change at a time (audiences/registry.py)
    app.state.connections = ConnectionRegistry(service.master_key)  # audience -> output (audiences/connections.py)
    app.state.connections.load(service.connection)
    upkeep = AudienceUpkeep(service.connection, app.state.audiences, app.state.calculated, app.state.calculation,
                            service.computation_gate)
    delivery = DeliveryService(service.connection, app.state.connections, app.state.audiences,
                               lambda workspace_id: service.workspaces.get(workspace_id).scope, service.computation_gate,
                               outputs=server_outputs(app.state.connections, service.writer, app.state.calculated,
                                                      app.state.audience_changes))
    upkeep.on_applied.append(delivery.memberships_changed)  # real time: changed memberships are diffed at once
    app.state.delivery = delivery
    app.state.upkeep = upkeep
    app.state.background_tasks = upkeep.tasks  # computations running off the event loop (audiences/upkeep.py)
    app.state.admin_token = admin_token
    app.state.buckets = TokenBuckets()
    install_error_handlers(app)
    add_body_schemas(app)
    app.include_router(idsync_routes.router)
    app.include_router(platform_routes.router)
    app.include_router(events_routes.router)
    app.include_router(import_routes.router)
    app.include_router(profile_routes.router)
    app.include_router(sql_routes.router)
    app.include_router(dsr_routes.router)
    app.include_router(ca_routes.router)
    app.include_router(audience_routes.router)
    app.include_router(connection_routes.router)

    @app.get("/healthz", tags=["Health"])
    async def healthz() -> Response:
        """Liveness only: says nothing about any workspace, so it needs no credentials. Once DuckDB has
        invalidated the database (a failed checkpoint) the query raises and the answer is 503: only a restart
        recovers, and failing liveness is how a supervisor learns it."""
        probe = service.connection.cursor()
        try:
            probe.execute("SELECT 1")
        finally:
            probe.close()
        return Response(b'{"status":"ok"}', media_type="application/json")

    # The web SDK calls from the page's origin with only x-mp-key; no cookies are involved.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "PUT", "OPTIONS"],
                       allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(GzipRequestMiddleware)
    return app
