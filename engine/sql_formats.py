"""Analyst query results as JSON, CSV, Parquet and a text table.

JSON keeps DuckDB values faithful where JSON can: integers of any size and decimals are numbers (never floats
that lose digits), timestamps are ISO 8601, JSON columns are embedded as JSON, BLOBs are base64, intervals are
ISO 8601 durations. CSV writes the same values as text (nested values as JSON). Parquet keeps Arrow types,
except the few Parquet cannot hold (intervals, unions), which become their text.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table as RichTable

from engine.analyst_sql import QueryResult
from engine.errors import BadRequest

FORMATS = ("json", "csv", "parquet")
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8",
               "parquet": "application/vnd.apache.parquet"}


def to_json(result: QueryResult) -> bytes:
    """`{"columns": [{"name", "type"}], "rows": [[...]], "row_count": N, "truncated": bool}`."""
    columns = [_json_column(result.table.column(i), kind) for i, kind in enumerate(result.types)]
    rows = [list(row) for row in zip(*columns)] if columns else []
    body = {"columns": result.columns, "rows": rows, "row_count": result.row_count, "truncated": result.truncated}
    return orjson.dumps(body, default=_json_default)


def to_csv(result: QueryResult) -> bytes:
    """A header line of column names, then one line per row; NULL is an empty field."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.table.column_names)
    columns = [[_text(value) for value in _python_values(column)] for column in result.table.columns]
    writer.writerows(zip(*columns))
    return out.getvalue().encode()


def to_parquet(result: QueryResult) -> bytes:
    """One Parquet file; its key-value metadata says whether the result was truncated."""
    table = result.table
    for i, field in enumerate(table.schema):
        if _parquet_cannot_hold(field.type):
            values = [_text(value) if value is not None else None for value in table.column(i).to_pylist()]
            table = table.set_column(i, pa.field(field.name, pa.string()), pa.array(values, pa.string()))
    metadata = {b"idmesh.truncated": str(result.truncated).lower().encode(),
                b"idmesh.duckdb_types": orjson.dumps(list(result.types))}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def render_text(document: dict[str, Any], width: int | None = None) -> str:
    """A text table of a JSON result document (as `to_json` writes it), for terminals."""
    table = RichTable(show_header=True, header_style="bold", show_lines=False)
    for column in document["columns"]:
        table.add_column(f"{column['name']}\n{column['type']}", overflow="fold",
                         justify="right" if _is_numeric(column["type"]) else "left")
    for row in document["rows"]:
        table.add_row(*["NULL" if value is None else _text(value) for value in row])
    console = Console(file=io.StringIO(), width=width or 100_000, force_terminal=False, color_system=None)
    if width is None:  # no terminal to fit: as wide as the content
        console = Console(file=io.StringIO(), width=max(20, console.measure(table).maximum),
                          force_terminal=False, color_system=None)
    console.print(table)
    rows = document["row_count"]
    footer = f"{rows} row{'s' if rows != 1 else ''}"
    if document["truncated"]:
        footer += " (truncated: the query has more rows than the limit)"
    return console.file.getvalue() + footer + "\n"


SERIALIZERS: dict[str, Callable[[QueryResult], bytes]] = {"json": to_json, "csv": to_csv, "parquet": to_parquet}


def serialize(result: QueryResult, answer_format: str) -> bytes:
    """The result in one of FORMATS; a value the format cannot hold is a 400 naming the format, not a crash."""
    try:
        return SERIALIZERS[answer_format](result)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"the answer cannot be written as {answer_format}: {exc}", field="format") from None


def _python_values(column: pa.ChunkedArray) -> list[Any]:
    try:
        values = column.to_pylist()
    except (ValueError, OverflowError):  # a date or timestamp Python's datetime cannot hold
        values = [_scalar_value(scalar) for scalar in column]
    if pa.types.is_map(column.type):
        # a map reads back as (key, value) pairs; an object is what a JSON reader expects when keys are text
        return [dict(v) if v is not None and all(isinstance(k, str) for k, _ in v) else v for v in values]
    return values


def _json_column(column: pa.ChunkedArray, kind: str) -> list[Any]:
    values = _python_values(column)
    if kind == "JSON":  # DuckDB hands JSON over as its text; embed it as JSON, not as a string
        return [orjson.Fragment(v) if isinstance(v, str) and _valid_json(v) else v for v in values]
    return values


_INFINITIES = {2**63 - 1: "infinity", -(2**63 - 1): "-infinity",   # DuckDB's timestamp infinities
               2**31 - 1: "infinity", -(2**31 - 1): "-infinity"}   # and date ones
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _scalar_value(scalar: pa.Scalar) -> Any:
    """One value, with ISO text for what Python's datetime cannot hold: infinities, nanoseconds, years outside
    1..9999 (DuckDB's DATE reaches 5877642 BC)."""
    try:
        return scalar.as_py()
    except (ValueError, OverflowError):
        pass
    raw, kind = getattr(scalar, "value", None), scalar.type
    if not isinstance(raw, int):
        return str(scalar)
    if raw in _INFINITIES:
        return _INFINITIES[raw]
    if pa.types.is_date32(kind):
        return _civil_date(raw)
    if pa.types.is_timestamp(kind):
        per_second = _PER_SECOND[kind.unit]
        seconds, fraction = divmod(raw, per_second)
        days, second_of_day = divmod(seconds, 86_400)
        hours, rest = divmod(second_of_day, 3600)
        text = f"{_civil_date(days)}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
        if fraction:
            text += f".{fraction:0{len(str(per_second)) - 1}d}"
        return text + ("+00:00" if kind.tz else "")  # DuckDB exports TIMESTAMPTZ as UTC instants
    return str(scalar)


def _civil_date(days: int) -> str:
    """Days since 1970-01-01 as an ISO 8601 date in the proleptic Gregorian calendar, any year (year 0 is 1 BC)."""
    shifted = days + 719_468  # days since 0000-03-01
    era, day_of_era = divmod(shifted, 146_097)
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153  # March = 0
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = year_of_era + era * 400 + (month <= 2)
    return f"{'-' if year < 0 else ''}{abs(year):04d}-{month:02d}-{day:02d}"


def _valid_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _json_default(value: Any) -> Any:
    """Values orjson does not encode by itself."""
    if isinstance(value, decimal.Decimal):
        # digits as they are: HUGEINT and DECIMAL(38, s) do not fit a float or a 64-bit integer
        return orjson.Fragment(str(value)) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, pa.MonthDayNano):
        return _iso_duration(value)
    return str(value)


def _text(value: Any) -> str:
    """One value as CSV or table text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, pa.MonthDayNano | bytes):
        return _json_default(value)
    return orjson.dumps(value, default=_json_default).decode()


def _iso_duration(value: pa.MonthDayNano) -> str:
    """DuckDB keeps months, days and time apart (a month is not 30 days), and so does this: INTERVAL 1 DAY is
    P1D, 90 minutes PT5400S."""
    seconds = (decimal.Decimal(value.nanoseconds) / 1_000_000_000).normalize()
    text = "P" + (f"{value.months}M" if value.months else "") + (f"{value.days}D" if value.days else "")
    if seconds or text == "P":
        text += f"T{seconds:f}S"
    return text


def _parquet_cannot_hold(arrow_type: pa.DataType) -> bool:
    if pa.types.is_interval(arrow_type) or pa.types.is_union(arrow_type):
        return True
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _parquet_cannot_hold(arrow_type.value_type)
    if pa.types.is_struct(arrow_type):
        return any(_parquet_cannot_hold(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_map(arrow_type):
        return _parquet_cannot_hold(arrow_type.key_type) or _parquet_cannot_hold(arrow_type.item_type)
    return False


def _is_numeric(duckdb_type: str) -> bool:
    return duckdb_type.split("(")[0] in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                                         "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL"}
