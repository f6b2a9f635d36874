"""CSV import (reference §2 "CSV import"): an mParticle-style CSV file becomes one Events API batch per row.

The file name says the event type (`*-custom_event.csv`, `*-commerce_event.csv`, `*-screen_view.csv`,
`*-eventless.csv`); columns are case-sensitive dot paths into the batch (`user_identities.email`,
`events.data.product_action.products.price`, ...). The header is checked as a whole before any row is read, so a
bad header writes nothing. Then the file is streamed: each row becomes exactly one batch holding at most one
event (and one product), so the ingestor accepts or rejects every row on its own: a bad row writes nothing and
never takes its neighbours down. Rows are handed to a sink in chunks (one `EventIngestor.ingest` call or one
HTTP request each) for throughput.

Replays: every row carries `source_request_id = "csv-" + hash(file bytes up to the end of the row)`. The
ingestor stores a source_request_id once per workspace, so re-importing the same file stores nothing twice,
and neither does a file that grew by appending rows (its earlier rows hash the same); rows after an edit
count as new. Keying on the prefix rather than the whole file keeps this to one streaming pass.

Values are strings except the typed fields (mpid, timestamps, commerce amounts, quantities, positions). An
event's `timestamp_unixtime_ms` is also the batch's, so the row's user attributes are dated by it and lose
against newer values ("latest timestamp wins") instead of overwriting them at import time.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import orjson

from engine.event_batches import DEVICE_IDENTITY_KEYS, MAX_TIMESTAMP_MS, USER_IDENTITY_KEYS
from engine.ingest import MAX_BATCH_BYTES, BatchOutcome, EventIngestor
from engine.workspaces import Workspace

SOURCE = "import"  # the batches view's `source` for imported rows
FILE_SUFFIXES: dict[str, str | None] = {
    "-custom_event.csv": "custom_event", "-commerce_event.csv": "commerce_event",
    "-screen_view.csv": "screen_view", "-eventless.csv": None,
}
MAX_ROW_BYTES = 80 * 1024   # rows must be smaller than this
MAX_COLUMNS = 50            # files must have fewer columns than this


@dataclass(frozen=True)
class RowError:
    row: int        # the file line where the row starts: 1 is the header, 0 the file itself
    column: str     # the column (dot path) at fault; "" when it is the row or file as a whole
    message: str


class CsvFileError(Exception):
    """The file cannot be imported at all (its name, its header, unreadable); nothing was written."""

    def __init__(self, errors: list[RowError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class EncodedBatch:
    row: int
    batch: dict[str, Any]
    json: bytes  # serialized once: its size is checked here, and the HTTP sink sends these bytes as they are


@dataclass
class ImportSummary:
    rows: int = 0        # data rows read, blank lines aside
    stored: int = 0
    duplicates: int = 0  # stored by an earlier import of the same rows
    rejected: int = 0
    bytes_read: int = 0


# Stores a chunk of batches and answers one outcome per batch, in order (index within the chunk).
Sink = Callable[[list[EncodedBatch]], Awaitable[list[BatchOutcome]]]


def ingestor_sink(ingestor: EventIngestor, workspace: Workspace) -> Sink:
    """The in-process sink, for when this process owns the database."""

    async def send(batches: list[EncodedBatch]) -> list[BatchOutcome]:
        return await ingestor.ingest(workspace, [b.batch for b in batches], SOURCE,
                                     sizes=[len(b.json) for b in batches])

    return send


def event_type_for(file_name: str) -> str | None:
    """The event type a file name announces (None: eventless), or CsvFileError."""
    for suffix, event_type in FILE_SUFFIXES.items():
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return event_type
    raise CsvFileError([RowError(0, "", f"{file_name}: the file name must end with one of "
                                        f"{', '.join(FILE_SUFFIXES)} (one event type per file)")])


# --- typed cells ---------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _text(cell: str) -> str:
    return cell


def _int64(text: str) -> int | None:
    """A whole number's value, or None when it needs more than 64 bits: orjson cannot write it (a row holding one
    stopped the whole import), and the store's integer columns could not hold it."""
    if len(text.lstrip("-").lstrip("0")) > 19:
        return None  # checked before int(), which refuses more than 4300 digits with a message of its own
    value = int(text)
    return value if -(1 << 63) <= value < (1 << 63) else None


def _integer(cell: str) -> int:
    value = _int64(cell.strip()) if _INTEGER.fullmatch(cell.strip()) else None
    if value is None:
        raise ValueError("must be a whole number of at most 64 bits")
    return value


def _number(cell: str) -> int | float:
    value = cell.strip()
    whole = _int64(value) if _INTEGER.fullmatch(value) else None
    if whole is not None:
        return whole
    # past 64 bits a whole number becomes a float, as orjson reads a JSON integer that size
    if not _DECIMAL.fullmatch(value) or not math.isfinite(float(value)):
        raise ValueError("must be a number")
    return float(value)


def _timestamp(cell: str) -> int:
    value = cell.strip()
    stamp = _int64(value) if value.isdigit() and value.isascii() else None
    if stamp is None or stamp > MAX_TIMESTAMP_MS:
        raise ValueError("must be a unix time in milliseconds")
    return stamp


def _mpid(cell: str) -> int:
    value = cell.strip()
    if not _INTEGER.fullmatch(value) or not -(1 << 63) <= int(value) < (1 << 63):
        raise ValueError("must be a 64-bit integer")
    return int(value)


# --- the header ----------------------------------------------------------------------------------------------

Convert = Callable[[str], Any]

# `events.data.<field>` per event type, besides custom_attributes.<name> and the commerce product action
_DATA_FIELDS: dict[str, dict[str, Convert]] = {
    "custom_event": {"timestamp_unixtime_ms": _timestamp, "event_name": _text, "custom_event_type": _text},
    "screen_view": {"timestamp_unixtime_ms": _timestamp, "screen_name": _text},
    "commerce_event": {"timestamp_unixtime_ms": _timestamp, "currency_code": _text},
}
_ACTION_FIELDS: dict[str, Convert] = {
    "action": _text, "transaction_id": _text, "affiliation": _text, "coupon_code": _text, "checkout_step": _integer,
    "checkout_options": _text, "product_action_list": _text, "product_list_source": _text,
    "total_amount": _number, "tax_amount": _number, "shipping_amount": _number,
}
_PRODUCT_FIELDS: dict[str, Convert] = {
    "id": _text, "name": _text, "brand": _text, "category": _text, "variant": _text, "coupon_code": _text,
    "position": _integer, "price": _number, "quantity": _number, "total_product_amount": _number,
}
_REQUIRED_COLUMN = {"custom_event": "events.data.event_name", "screen_view": "events.data.screen_name",
                    "commerce_event": "events.data.product_action.action"}
# mParticle's CSV documentation spells some user identities the IDSync way (other2); take both spellings
_EVENTS_KEY_OF_WIRE = {wire: key for key, wire in USER_IDENTITY_KEYS.items() if key != "customer_id"}

_BATCH, _DATA, _ACTION, _PRODUCT = "batch", "data", "action", "product"


@dataclass(frozen=True)
class Column:
    name: str
    container: str          # which object of the batch the value goes into: batch, data, action or product
    keys: tuple[str, ...]   # the path inside that object
    convert: Convert
    identity: str | None = None  # the IDSync wire key, for identity columns


def plan_header(names: list[str], event_type: str | None) -> list[Column]:
    """The columns of a header, or CsvFileError listing every problem with it."""
    problems: list[RowError] = []
    if len(names) >= MAX_COLUMNS:
        problems.append(RowError(1, "", f"the header has {len(names)} columns; files must have fewer than "
                                        f"{MAX_COLUMNS}"))
    columns: list[Column] = []
    seen: set[str] = set()
    identities: dict[str, str] = {}
    for name in names:
        if name in seen:
            problems.append(RowError(1, name, f"column {name!r} appears more than once; names must be unique"))
            continue
        seen.add(name)
        try:
            column = _column(name, event_type)
        except ValueError as exc:
            problems.append(RowError(1, name, str(exc)))
            continue
        if column.identity is not None:
            if column.identity in identities:
                problems.append(RowError(1, name, f"{name} and {identities[column.identity]} name the same "
                                                  "identity type"))
            identities[column.identity] = name
        columns.append(column)
    if not identities and "mpid" not in seen:
        problems.append(RowError(1, "", "the header has no identity column: add mpid, user_identities.<type> "
                                        "or device_info.<type>"))
    required = _REQUIRED_COLUMN.get(event_type or "")
    if required and required not in seen:
        problems.append(RowError(1, required, f"a -{event_type}.csv file needs the column {required}"))
    if problems:
        raise CsvFileError(problems)
    return columns


def _column(name: str, event_type: str | None) -> Column:
    if name == "environment":
        return Column(name, _BATCH, ("environment",), _text)
    if name == "mpid":
        return Column(name, _BATCH, ("mpid",), _mpid)
    root, _, rest = name.partition(".")
    if root == "user_identities" and rest:
        key = rest if rest in USER_IDENTITY_KEYS else _EVENTS_KEY_OF_WIRE.get(rest)
        if key is None:
            raise ValueError(f"{name}: {rest!r} is not a user identity type (customer_id, email, other, "
                             "other_id_2, mobile_number, ...)")
        return Column(name, _BATCH, ("user_identities", key), _text, USER_IDENTITY_KEYS[key])
    if root == "device_info" and rest:
        if rest not in DEVICE_IDENTITY_KEYS:
            raise ValueError(f"{name}: {rest!r} is not a device identity type ({', '.join(DEVICE_IDENTITY_KEYS)})")
        return Column(name, _BATCH, ("device_info", rest), _text, DEVICE_IDENTITY_KEYS[rest])
    if root == "user_attributes" and rest:
        return Column(name, _BATCH, ("user_attributes", rest), _text)
    if name.startswith("events.data.") and len(name) > len("events.data."):
        return _event_column(name, name[len("events.data."):], event_type)
    raise ValueError(f"unknown column {name!r}: columns are environment, mpid, user_identities.<type>, "
                     "device_info.<type>, user_attributes.<name> or events.data.<field> (case-sensitive)")


def _event_column(name: str, path: str, event_type: str | None) -> Column:
    if event_type is None:
        raise ValueError(f"{name}: an -eventless.csv file holds identities and user attributes only")
    fields = _DATA_FIELDS[event_type]
    if path in fields:
        return Column(name, _DATA, (path,), fields[path])
    if path.startswith("custom_attributes.") and len(path) > len("custom_attributes."):
        return Column(name, _DATA, ("custom_attributes", path[len("custom_attributes."):]), _text)
    if event_type == "commerce_event" and path.startswith("product_action.products."):
        product_path = path[len("product_action.products."):]
        if product_path in _PRODUCT_FIELDS:
            return Column(name, _PRODUCT, (product_path,), _PRODUCT_FIELDS[product_path])
        if product_path.startswith("attributes.") and len(product_path) > len("attributes."):
            return Column(name, _PRODUCT, ("attributes", product_path[len("attributes."):]), _text)
        raise ValueError(f"{name}: a product has {', '.join(_PRODUCT_FIELDS)} and attributes.<name>")
    if event_type == "commerce_event" and path.startswith("product_action."):
        action_path = path[len("product_action."):]
        if action_path in _ACTION_FIELDS:
            return Column(name, _ACTION, (action_path,), _ACTION_FIELDS[action_path])
        raise ValueError(f"{name}: a product action has {', '.join(_ACTION_FIELDS)} and products.<field>")
    owner = next((t for t, f in _DATA_FIELDS.items() if path in f), None)
    if owner is None and path.startswith("product_action."):
        owner = "commerce_event"
    if owner is not None:
        raise ValueError(f"{name} belongs in a -{owner}.csv file, not a -{event_type}.csv file")
    raise ValueError(f"{name}: a {event_type} has events.data.{{{', '.join(fields)}}} and "
                     "events.data.custom_attributes.<name>")


# --- reading the file ----------------------------------------------------------------------------------------

class _LineProblem(Exception):
    """A physical line that cannot be part of any row; raised through csv.reader, which drops the row."""


class _LineSource:
    """The file's physical lines for csv.reader, decoded one at a time, counting lines and bytes, hashing all
    that was read (the replay key of a row is the hash of the file up to the row's end), and refusing a row
    once it reaches the size limit, so an endless line never sits in memory."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.blake2b(digest_size=16)
        self.lines = 0
        self.bytes_read = 0
        self._row_bytes = 0

    def start_row(self) -> int:
        """Called before csv.reader reads a row; returns the line the row starts on."""
        self._row_bytes = 0
        return self.lines + 1

    def digest(self) -> str:
        return self._hash.copy().hexdigest()

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        raw = self._read(MAX_ROW_BYTES + 1)
        if not raw:
            raise StopIteration
        first = self.lines == 0
        self.lines += 1
        if not raw.endswith(b"\n") and len(raw) > MAX_ROW_BYTES:
            while raw and not raw.endswith(b"\n"):
                raw = self._read(1 << 16)  # skip the rest of the line
        if self._row_bytes >= MAX_ROW_BYTES:
            raise _LineProblem(f"the row is {MAX_ROW_BYTES} bytes or more; rows must be smaller than "
                               f"{MAX_ROW_BYTES // 1024} KB")
        try:
            return raw.decode("utf-8-sig" if first else "utf-8")  # spreadsheets start files with a BOM
        except UnicodeDecodeError as exc:
            raise _LineProblem(f"line {self.lines} is not valid UTF-8 (byte {exc.start})") from None

    def _read(self, limit: int) -> bytes:
        raw = self._stream.readline(limit)
        self._hash.update(raw)
        self.bytes_read += len(raw)
        self._row_bytes += len(raw)
        return raw


# a chunk sent to the sink: its rows (batches and rows already rejected here) and the sink's answer to come
_Pending = tuple[list[EncodedBatch | RowError], asyncio.Future[list[BatchOutcome]] | None]


class CsvImport:
    """One CSV file being imported: the constructor checks its name and header, `run` streams its rows into a
    sink. Use it as a context manager (it holds the file open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.event_type = event_type_for(self.path.name)
        try:
            self._stream: BinaryIO = open(self.path, "rb")  # closed by close()
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise CsvFileError([RowError(0, "", f"cannot read {self.path}: {exc.strerror}")]) from None
        self._lines = _LineSource(self._stream)
        self._reader = csv.reader(self._lines, strict=True)  # RFC 4180: comma, double quotes, CRLF or LF
        self.summary = ImportSummary()
        try:
            self.columns = plan_header(self._read_header(), self.event_type)
        except CsvFileError:
            self.close()
            raise
        self._identity_columns = {c.identity: c.name for c in self.columns if c.identity is not None}

    def __enter__(self) -> CsvImport:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    def _read_header(self) -> list[str]:
        try:
            header = next(self._reader, None)
        except (_LineProblem, csv.Error) as exc:
            raise CsvFileError([RowError(1, "", f"the header cannot be read: {exc}")]) from None
        if not header or header == [""]:
            raise CsvFileError([RowError(1, "", "the file has no header row")])
        return header

    async def run(self, sink: Sink, max_batches: int, max_bytes: int | None = None,
                  on_error: Callable[[RowError], None] | None = None,
                  on_progress: Callable[[ImportSummary], None] | None = None) -> ImportSummary:
        """Store every row through `sink`, `max_batches` rows (and at most `max_bytes` of JSON array) per call;
        errors are reported in row order. The next chunk is parsed while one is in flight, but never sent
        before that one is answered: rows must be stored in file order (an identity a row adds decides where
        a later row lands), and requests over HTTP could overtake each other. (Two chunks in flight into the
        in-process ingestor, which keeps call order, measured no faster: its planning and commits share the GIL.)"""
        pending: _Pending | None = None
        try:
            for chunk in self._chunks(max_batches, max_bytes):
                if pending is not None:
                    await self._finish(*pending, on_error, on_progress)
                    pending = None
                batches = [item for item in chunk if isinstance(item, EncodedBatch)]
                pending = (chunk, asyncio.ensure_future(sink(batches)) if batches else None)
                await asyncio.sleep(0)  # let the sink plan / send this chunk before the next one is parsed
            if pending is not None:
                await self._finish(*pending, on_error, on_progress)
                pending = None
        finally:
            if pending is not None and pending[1] is not None:
                pending[1].cancel()
        return self.summary

    async def _finish(self, chunk: list[EncodedBatch | RowError], future: asyncio.Future[list[BatchOutcome]] | None,
                      on_error: Callable[[RowError], None] | None,
                      on_progress: Callable[[ImportSummary], None] | None) -> None:
        outcomes = iter(await future if future is not None else [])
        summary = self.summary
        for item in chunk:
            error = item if isinstance(item, RowError) else None
            if isinstance(item, EncodedBatch):
                outcome = next(outcomes)
                if outcome.status == "accepted":
                    summary.stored += 1
                elif outcome.status == "duplicate":
                    summary.duplicates += 1
                else:
                    error = self._row_error(item.row, outcome)
            if error is not None:
                summary.rejected += 1
                if on_error is not None:
                    on_error(error)
        if on_progress is not None:
            on_progress(summary)

    def _row_error(self, row: int, outcome: BatchOutcome) -> RowError:
        """The ingestor names batch paths (`events[0].data.event_name`, `user_identities.customerid`);
        report them as this file's columns."""
        error = outcome.error
        message = error.message.replace("events[0].", "events.").replace("products[0]", "products")
        column = (error.field or "").replace("events[0].", "events.").replace("products[0]", "products")
        if column.startswith("user_identities."):
            column = self._identity_columns.get(column[len("user_identities."):], column)
        if column in ("batch", "body"):
            column = ""
        return RowError(row, column, message)

    def _chunks(self, max_batches: int, max_bytes: int | None) -> Iterator[list[EncodedBatch | RowError]]:
        chunk: list[EncodedBatch | RowError] = []
        size = 2  # the brackets of a JSON array
        for item in self._rows():
            cost = len(item.json) + 1 if isinstance(item, EncodedBatch) else 0
            if chunk and (len(chunk) >= max_batches or max_bytes is not None and size + cost > max_bytes):
                yield chunk
                chunk, size = [], 2
            chunk.append(item)
            size += cost
        if chunk:
            yield chunk

    def _rows(self) -> Iterator[EncodedBatch | RowError]:
        while True:
            row = self._lines.start_row()
            try:
                cells = next(self._reader)
            except StopIteration:
                return
            except _LineProblem as exc:
                cells, problem = None, str(exc)
            except csv.Error as exc:
                cells, problem = None, f"not valid CSV (RFC 4180): {exc}"
            finally:
                self.summary.bytes_read = self._lines.bytes_read
            if cells == []:
                continue  # a blank line
            self.summary.rows += 1
            yield RowError(row, "", problem) if cells is None else self._encode(row, cells)

    def _encode(self, row: int, cells: list[str]) -> EncodedBatch | RowError:
        if len(cells) != len(self.columns):
            return RowError(row, "", f"the row has {len(cells)} fields; the header has {len(self.columns)}")
        try:
            batch = self._batch(cells)
        except _CellError as exc:
            return RowError(row, exc.column, exc.message)
        batch["source_request_id"] = "csv-" + self._lines.digest()
        encoded = orjson.dumps(batch)
        if len(encoded) > MAX_BATCH_BYTES:
            return RowError(row, "", f"the row makes a batch of {len(encoded)} bytes; at most {MAX_BATCH_BYTES} "
                                     "are accepted")
        return EncodedBatch(row, batch, encoded)

    def _batch(self, cells: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        data: dict[str, Any] = {}
        action: dict[str, Any] = {}
        product: dict[str, Any] = {}
        targets = {_BATCH: batch, _DATA: data, _ACTION: action, _PRODUCT: product}
        for column, cell in zip(self.columns, cells):
            if cell == "":
                continue  # empty means absent
            try:
                value = column.convert(cell)
            except ValueError as exc:
                shown = cell if len(cell) <= 40 else cell[:40] + "..."
                raise _CellError(column.name, f"{column.name} {exc}, not {shown!r}") from None
            _put(targets[column.container], column.keys, value)
        if self.event_type is not None:
            if product:
                action["products"] = [product]  # one product per event
            if action or self.event_type == "commerce_event":
                data["product_action"] = action  # even empty, so a missing action is reported as such
            batch["events"] = [{"event_type": self.event_type, "data": data}]
            if "timestamp_unixtime_ms" in data:
                batch["timestamp_unixtime_ms"] = data["timestamp_unixtime_ms"]
        return batch


class _CellError(Exception):
    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def _put(target: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value
