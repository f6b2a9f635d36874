"""Jobs that run inside the server process on APScheduler (they share the store with the requests)."""

from __future__ import annotations

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine.dsr import DsrService
from engine.idsync import IdSyncService

ALIAS_POLL_SECONDS = 30


def start_background_jobs(service: IdSyncService, dsr: DsrService | None = None) -> AsyncIOScheduler:
    """Start the scheduler on the running event loop; the caller shuts it down."""
    scheduler = AsyncIOScheduler()
    scheduler.add_job(service.process_due_aliases, "interval", seconds=ALIAS_POLL_SECONDS,
                      id="process-due-aliases", max_instances=1, coalesce=True)
    if dsr is not None:  # due data subject requests, then callbacks to retry (engine/dsr.py)
        scheduler.add_job(dsr.run_scheduled, "interval", seconds=dsr.settings.poll_seconds,
                          id="data-subject-requests", max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler
