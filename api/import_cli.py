"""`idmesh import FILE --workspace ID`: an mParticle-style CSV file into a workspace (engine/csv_import.py).

DuckDB allows one writing process per file, so the rows go through whoever owns the database: a server
answering at --url gets them over HTTP (the admin import endpoint, api/import_routes.py); when none answers,
this process opens --db itself. Exit codes: 0 every row is stored (now or by an earlier import), 1 some rows
were rejected, 2 the import could not run (file name or header, unreadable file, no database, refused token,
unknown workspace, the server stopped answering).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import duckdb
import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from engine.csv_import import CsvFileError, CsvImport, EncodedBatch, ImportSummary, RowError, Sink, ingestor_sink
from engine.errors import BadRequest, IdmeshError
from engine.idsync import IdSyncService
from engine.ingest import MAX_BULK_BATCHES, MAX_REQUEST_BYTES, BatchOutcome, EventIngestor

DIRECT_CHUNK = 500  # rows per ingest call (one group commit) when writing to the file ourselves
SHOWN_ERRORS = 10


class ImportAborted(Exception):
    """The rows cannot go anywhere: no database, a refused token, an unknown workspace, a server gone."""


def add_import_command(subparsers: Any) -> None:
    from api.cli import DEFAULT_DB  # api.cli imports this module; it is fully loaded by the time it calls us

    command = subparsers.add_parser("import", help="import an mParticle-style CSV file into a workspace",
                                    description="Import a *-custom_event.csv, *-commerce_event.csv, "
                                                "*-screen_view.csv or *-eventless.csv file, one batch per row.")
    command.add_argument("file", help="the CSV file; its name says the event type")
    command.add_argument("--workspace", required=True, help="workspace id (ws_...)")
    command.add_argument("--url", default=os.environ.get("IDMESH_URL", "http://127.0.0.1:8080"),
                         help="a running server (admin token from IDMESH_ADMIN_TOKEN); when none answers, "
                              "the rows are written to --db directly")
    command.add_argument("--db", default=os.environ.get("IDMESH_DB", DEFAULT_DB),
                         help="DuckDB file, used when no server answers at --url")
    command.add_argument("--errors", help="write every rejected row (row, column, message) to this CSV file")


def import_command(args: argparse.Namespace) -> int:
    try:
        report = _ErrorReport(args.errors)
    except OSError as exc:
        print(f"idmesh import: cannot write --errors {args.errors}: {exc.strerror}", file=sys.stderr)
        return 2
    with report:
        try:
            job = CsvImport(args.file)
        except CsvFileError as exc:
            for error in exc.errors:
                report.add(error)
            print(f"idmesh import: {args.file} cannot be imported; nothing was written", file=sys.stderr)
            report.show()
            return 2
        with job:
            try:
                where = _import(job, args, report)
            except ImportAborted as exc:
                print(f"idmesh import: {exc}", file=sys.stderr)
                if job.summary.rows:
                    _print_summary(job, args.workspace, "stopped", job.summary)
                report.show()
                return 2
        _print_summary(job, args.workspace, where, job.summary)
        report.show()
    return 0 if job.summary.rejected == 0 else 1


def _import(job: CsvImport, args: argparse.Namespace, report: _ErrorReport) -> str:
    """Run the import through a server when one answers, else into the file; say which."""
    url = args.url.rstrip("/")
    if _server_answers(url):
        token = os.environ.get("IDMESH_ADMIN_TOKEN")
        if not token:
            raise ImportAborted(f"a server answers at {url}: set IDMESH_ADMIN_TOKEN to its admin token")
        with _ProgressBar(job) as progress:
            asyncio.run(_import_over_http(job, url, token, args.workspace, report.add, progress.update))
        return f"over {url}"
    with _ProgressBar(job) as progress:
        _import_direct(job, args.db, url, args.workspace, report.add, progress.update)
    return f"into {args.db}"


def _server_answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=httpx.Timeout(10, connect=2))
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return False
    except httpx.HTTPError as exc:
        raise ImportAborted(f"{url} does not answer as an idmesh server: {exc}") from None
    return True


# --- over HTTP -----------------------------------------------------------------------------------------------

async def _import_over_http(job: CsvImport, url: str, token: str, workspace_id: str,
                            on_error: Callable[[RowError], None],
                            on_progress: Callable[[ImportSummary], None]) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(120, connect=10)) as client:
        await _check_workspace(client, workspace_id)
        # the endpoint's limits are /v2/bulkevents': 100 batches and 256 KB a request
        await job.run(_http_sink(client, workspace_id), MAX_BULK_BATCHES, MAX_REQUEST_BYTES, on_error, on_progress)


async def _check_workspace(client: httpx.AsyncClient, workspace_id: str) -> None:
    """Fail before reading any row when the token or the workspace is wrong."""
    response = await _call(client, "GET", f"/platform/v2/workspaces/{workspace_id}")
    if response.status_code == 401:
        raise ImportAborted(f"the server at {client.base_url} refused the admin token: set IDMESH_ADMIN_TOKEN to "
                            "the one it was started with")
    if response.status_code == 404:
        raise ImportAborted(f"the server at {client.base_url} has no workspace {workspace_id}")
    if response.status_code != 200:
        raise ImportAborted(f"the server at {client.base_url} answered {response.status_code}: {response.text[:200]}")


def _http_sink(client: httpx.AsyncClient, workspace_id: str) -> Sink:
    path = f"/platform/v2/workspaces/{workspace_id}/events"

    async def send(batches: list[EncodedBatch]) -> list[BatchOutcome]:
        body = b"[" + b",".join(b.json for b in batches) + b"]"
        response = await _call(client, "POST", path, content=body, headers={"Content-Type": "application/json"})
        try:
            answer = response.json()
        except ValueError:
            answer = None
        results = answer.get("results") if isinstance(answer, dict) else None
        # 400 with results: every batch of the request was rejected, which is per-row news, not a failure
        if response.status_code not in (202, 207, 400) or not isinstance(results, list) \
                or len(results) != len(batches):
            raise ImportAborted(f"the server answered {response.status_code} to rows {batches[0].row}-"
                                f"{batches[-1].row}: {response.text[:300]}")
        return [_outcome(index, result) for index, result in enumerate(results)]

    return send


async def _call(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ImportAborted(f"the server at {client.base_url} stopped answering: {exc!r}") from None


def _outcome(index: int, result: Any) -> BatchOutcome:
    error = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, dict):
        return BatchOutcome(index, "rejected", error=BadRequest(str(error.get("message")), error.get("field")))
    status = result.get("status") if isinstance(result, dict) else None
    if status not in ("accepted", "duplicate"):
        raise ImportAborted(f"the server answered a result this client does not know: {result!r}")
    return BatchOutcome(index, status)


# --- into the file -------------------------------------------------------------------------------------------

def _import_direct(job: CsvImport, db_path: str, url: str, workspace_id: str, on_error: Callable[[RowError], None],
                   on_progress: Callable[[ImportSummary], None]) -> None:
    if not Path(db_path).exists():
        raise ImportAborted(f"no server answers at {url}, and there is no database at {db_path} (--db)")
    try:
        service = IdSyncService.open(db_path)
    except duckdb.Error as exc:
        raise ImportAborted(f"no server answers at {url}, and {db_path} cannot be opened ({exc}); if a server "
                            "owns it, give its address with --url") from None
    try:
        workspace = service.workspaces.get(workspace_id)
        sink = ingestor_sink(EventIngestor(service), workspace)
        asyncio.run(job.run(sink, DIRECT_CHUNK, None, on_error, on_progress))
    except IdmeshError as exc:  # an unknown workspace, or a commit that failed (disk full)
        raise ImportAborted(f"{db_path}: {exc.message}") from None
    finally:
        service.close()


# --- reporting -----------------------------------------------------------------------------------------------

class _ErrorReport:
    """Every rejected row into the --errors CSV as it is found (a file of millions of bad rows never sits in
    memory); the first few kept to print."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.count = 0
        self.first: list[RowError] = []
        self._file: TextIO | None = open(path, "w", newline="", encoding="utf-8") if path else None  # noqa: SIM115
        self._writer = csv.writer(self._file) if self._file else None
        if self._writer:
            self._writer.writerow(["row", "column", "message"])

    def __enter__(self) -> _ErrorReport:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._file:
            self._file.close()

    def add(self, error: RowError) -> None:
        self.count += 1
        if len(self.first) < SHOWN_ERRORS:
            self.first.append(error)
        if self._writer:
            self._writer.writerow([error.row, error.column, error.message])

    def show(self) -> None:
        for error in self.first:
            where = f"row {error.row}" if error.row else "file"
            print(f"  {where}{', ' + error.column if error.column else ''}: {error.message}", file=sys.stderr)
        if self.count > len(self.first):
            print(f"  ... and {self.count - len(self.first)} more", file=sys.stderr)
        if self.count and self.path:
            print(f"  all errors: {self.path}", file=sys.stderr)
        elif self.count > len(self.first):
            print("  --errors FILE writes them all", file=sys.stderr)


def _print_summary(job: CsvImport, workspace_id: str, where: str, summary: ImportSummary) -> None:
    print(f"{job.path.name} -> workspace {workspace_id} {where}: {summary.rows:,} rows, {summary.stored:,} stored, "
          f"{summary.duplicates:,} already imported, {summary.rejected:,} rejected", flush=True)


class _RowRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rows = task.fields.get("rows", 0)
        return Text(f"{rows / task.elapsed:,.0f} rows/s" if task.elapsed else "- rows/s", style="progress.data.speed")


class _ProgressBar:
    """Bytes read of the file and rows per second, on stderr."""

    def __init__(self, job: CsvImport) -> None:
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TextColumn("{task.fields[rows]:,} rows"), _RowRateColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True))
        self._task = self._progress.add_task(job.path.name, total=job.size, rows=0)

    def __enter__(self) -> _ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, summary: ImportSummary) -> None:
        self._progress.update(self._task, completed=summary.bytes_read, rows=summary.rows)
