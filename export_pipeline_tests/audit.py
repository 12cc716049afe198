"""The end of every fault scenario: each device-day's S3 folder holds exactly InfluxDB's rows.

Both sides are read in full (every object of the folder, every point of the day), so a row lost,
written twice, left over from an older export, or put in the wrong slice file fails the audit.

The audit is a second implementation of the contract in docs/datasets.md, written from that page
alone, so that a bug in the exporter cannot hide itself by being used on both sides of the
comparison:

- InfluxDB is read by another path: `SELECT *` in InfluxQL over plain HTTP, answered in JSON
  (the exporter asks for named columns and parses CSV with Arrow);
- the 12 columns are computed here in plain Python from the page's Schema table, not by
  `export_pipeline.engine.schema`;
- folders are built here from the page's Layout section, not by `export_pipeline.engine.layout`,
  and objects are parsed here: Parquet with pyarrow, CSV with a parser of our own that tells a
  quoted field from an unquoted one (the page's null is an unquoted empty field, `""` an empty
  string).

Only `export_pipeline.settings` is shared: it says where the data lives, not what it should be.

Values are compared exactly, floats included. Both InfluxDB's answers and Arrow's CSV writer print
a float as the shortest decimal that reads back as the same double (checked on 200,000 random
doubles, and by the exact round trips in test_audit.py), so neither format may change a value.
NaN is taken as equal to NaN (InfluxDB 1.x refuses to store it, but other versions may not).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from export_pipeline.settings import InfluxSettings, Settings
from export_pipeline_tests.conftest import Stack

# The Schema table of docs/datasets.md, in its order.
COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("device_id", pa.string()),
    ("device_type", pa.string()),
    ("location", pa.string()),
    ("voltage", pa.float64()),
    ("current", pa.float64()),
    ("power", pa.float64()),
    ("temperature", pa.float64()),
    ("hour", pa.int8()),
    ("day_of_week", pa.int8()),
    ("is_weekend", pa.bool_()),
    ("power_factor", pa.float64()),
)
NAMES = tuple(name for name, _ in COLUMNS)
TAGS = ("device_type", "location")
FIELDS = ("voltage", "current", "power", "temperature")
SECONDS_PER_DAY = 86_400
US_PER_SECOND = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# One row in NAMES order; the timestamp as microseconds since the epoch, so that it compares
# exactly whatever a reader makes of time zones.
Row = tuple[Any, ...]


# --- InfluxDB ------------------------------------------------------------------------------


def _influxql_string(value: str) -> str:
    """An InfluxQL single-quoted string literal (backslash, quote and newline escaped)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _influxql_identifier(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _json_documents(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of an answer: one, or one per chunk (newline-separated) when chunked."""
    decoder, position = json.JSONDecoder(), 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return
        document, position = decoder.raw_decode(text, position)
        yield document


def influx_points(
    influx: InfluxSettings, device_id: str, start_ns: int, end_ns: int
) -> list[dict[str, Any]]:
    """Every point of the device in `[start_ns, end_ns)`, as InfluxDB answers `SELECT *`: the
    time in epoch nanoseconds and every tag and field by name (null where the point has none)."""
    query = (
        f"SELECT * FROM {_influxql_identifier(influx.measurement)} "
        f'WHERE "device_id" = {_influxql_string(device_id)} '
        f"AND time >= {int(start_ns)} AND time < {int(end_ns)}"
    )
    headers = {"Accept": "application/json"}
    auth: tuple[str, str] | None = None
    if influx.token:
        headers["Authorization"] = f"Token {influx.token}"
    elif influx.username:
        auth = (influx.username, influx.password)
    answer = requests.get(
        f"{influx.url}/query",
        params={"db": influx.bucket, "q": query, "epoch": "ns", "chunked": "true"},
        headers=headers,
        auth=auth,
        timeout=120,
    )
    assert answer.status_code == 200, f"InfluxDB answered {answer.status_code}: {answer.text}"
    points: list[dict[str, Any]] = []
    for document in _json_documents(answer.text):
        assert "error" not in document, f"InfluxDB failed the audit's query: {document['error']}"
        for result in document.get("results", []):
            assert "error" not in result, f"InfluxDB failed the audit's query: {result['error']}"
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series["values"]:
                    points.append({**tags, **dict(zip(series["columns"], values, strict=True))})
    return points


# --- The Schema of docs/datasets.md, in plain Python -----------------------------------------


def _field(point: dict[str, Any], name: str) -> float | None:
    value = point.get(name)
    if value is None:
        return None
    # bool is an int in Python, but a boolean field is not a number in InfluxDB.
    assert isinstance(value, int | float) and not isinstance(value, bool), (
        f"InfluxDB holds {name}={value!r}, which is not a number"
    )
    return float(value)  # whole numbers such as 230 (or 230i) are exported as floats


def power_factor(power: float | None, voltage: float | None, current: float | None) -> float | None:
    """power / (voltage x current), clipped to [0, 1]; None when an input is missing, the
    apparent power is not above zero, or the ratio is not finite."""
    if power is None or voltage is None or current is None:
        return None
    apparent = voltage * current
    if not apparent > 0:  # also NaN
        return None
    ratio = power / apparent  # IEEE: overflows to inf rather than raising
    if not math.isfinite(ratio):
        return None
    return min(max(ratio, 0.0), 1.0)


def expected_row(point: dict[str, Any], device_id: str) -> Row:
    """One InfluxDB point as docs/datasets.md says it is exported."""
    time_ns = point["time"]
    assert isinstance(time_ns, int), f"InfluxDB's time {time_ns!r} is not epoch nanoseconds"
    micros = time_ns // 1_000  # nanoseconds truncated to microseconds (times after 1970)
    moment = EPOCH + timedelta(microseconds=micros)
    voltage, current, power, temperature = (_field(point, name) for name in FIELDS)
    weekday = moment.weekday()  # 0 = Monday, in UTC
    return (
        micros,
        device_id,
        point.get("device_type"),
        point.get("location"),
        voltage,
        current,
        power,
        temperature,
        moment.hour,
        weekday,
        weekday >= 5,
        power_factor(power, voltage, current),
    )


def influx_rows(influx: InfluxSettings, device_id: str, day: date) -> list[Row]:
    """The device-day's points in InfluxDB, as the rows docs/datasets.md says S3 must hold."""
    start_ns = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 10**9
    end_ns = start_ns + SECONDS_PER_DAY * 10**9
    points = influx_points(influx, device_id, start_ns, end_ns)
    # A point none of whose four fields is set (only fields that are not exported) carries
    # nothing to export: no row. The docs are silent; InfluxDB returns no row for it when asked
    # for the four fields, and the exporter and the late-data sweep's counts agree.
    return [
        expected_row(point, device_id)
        for point in points
        if any(point.get(name) is not None for name in FIELDS)
    ]


# --- S3: the Layout of docs/datasets.md and the two formats ----------------------------------


def device_day_folder(prefix: str, device_id: str, day: date, layout: str) -> str:
    """`{prefix}/device_id={id}/date={YYYY}/{MM}/{DD}/` (seed) or `.../date={YYYY-MM-DD}/`
    (hive), with a trailing slash; an empty prefix starts the key at `device_id=`."""
    if layout == "seed":
        day_part = f"date={day.year:04d}/{day.month:02d}/{day.day:02d}"
    elif layout == "hive":
        day_part = f"date={day.year:04d}-{day.month:02d}-{day.day:02d}"
    else:
        raise ValueError(f"docs/datasets.md has no layout {layout!r}")
    root = f"{prefix}/device_id={device_id}" if prefix else f"device_id={device_id}"
    return f"{root}/{day_part}/"


def _s3_client(settings: Settings) -> Any:
    return boto3.client("s3", endpoint_url=settings.s3.endpoint_url, region_name=settings.s3.region)


def _keys_under(client: Any, bucket: str, folder: str) -> list[str]:
    """Every key that starts with `folder`, in nested "folders" too."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def parquet_rows(body: bytes, key: str) -> list[Row]:
    """The rows of a Parquet object, after checking it has exactly the documented 12 columns."""
    table = pq.read_table(io.BytesIO(body))
    assert tuple(table.column_names) == NAMES, f"{key} has columns {table.column_names}"
    for (name, wanted), field in zip(COLUMNS, table.schema, strict=True):
        if pa.types.is_timestamp(wanted):
            ok = pa.types.is_timestamp(field.type) and field.type.unit == "us"
            ok = ok and field.type.tz in ("UTC", "+00:00")
        else:
            ok = field.type == wanted
        assert ok, f"{key}: column {name} is {field.type}, not {wanted}"
    micros = table.column("timestamp").cast(pa.int64()).to_pylist()
    others = [table.column(name).to_pylist() for name in NAMES[1:]]
    return [(stamp, *values) for stamp, *values in zip(micros, *others, strict=True)]


_CSV_FIELD = re.compile(r'"((?:[^"]|"")*)"|([^,"\r\n]*)')
_CSV_TIMESTAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z")
_CSV_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)", re.IGNORECASE)


def csv_records(text: str) -> list[list[tuple[str, bool]]]:
    """RFC 4180 records, each field as (text, whether it was quoted)."""
    records: list[list[tuple[str, bool]]] = []
    record: list[tuple[str, bool]] = []
    position = 0
    while text:
        match = _CSV_FIELD.match(text, position)
        assert match is not None  # the pattern matches the empty string
        quoted = match.group(1) is not None
        record.append((match.group(1).replace('""', '"') if quoted else match.group(2), quoted))
        position = match.end()
        if position == len(text):
            records.append(record)
            break
        if text[position] == ",":
            position += 1
            continue
        ending = 2 if text.startswith("\r\n", position) else 1 if text[position] == "\n" else 0
        assert ending, f"CSV: unexpected {text[position]!r} after a field at offset {position}"
        position += ending
        records.append(record)
        record = []
        if position == len(text):
            break
    return records


def _csv_value(text: str, quoted: bool, name: str, kind: pa.DataType) -> Any:
    """One CSV field as docs/datasets.md writes it: strings quoted, null an unquoted empty field."""
    if not quoted and text == "":
        return None
    if pa.types.is_timestamp(kind):
        match = _CSV_TIMESTAMP.fullmatch(text)
        assert quoted and match, f"{name} {text!r} is not a quoted 2026-02-07T12:00:00.000000Z"
        year, month, day, hour, minute, second, fraction = (int(g) for g in match.groups())
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        return int((moment - EPOCH).total_seconds()) * US_PER_SECOND + fraction
    if pa.types.is_string(kind):
        assert quoted, f"{name} {text!r} is a string written without quotes"
        return text
    assert not quoted, f"{name} {text!r} is a {kind} written in quotes"
    if pa.types.is_floating(kind):
        assert _CSV_FLOAT.fullmatch(text), f"{name} {text!r} is not a number"
        return float(text)
    if pa.types.is_integer(kind):
        assert re.fullmatch(r"-?\d+", text) and -128 <= int(text) <= 127, f"{name} {text!r}"
        return int(text)
    assert text in ("true", "false"), f"{name} {text!r} is not true or false"
    return text == "true"


def csv_rows(body: bytes, key: str) -> list[Row]:
    """The rows of a CSV object: a header of the 12 columns, then one record per row."""
    records = csv_records(body.decode("utf-8"))
    assert records, f"{key} is empty, without even a header"
    header = tuple(text for text, _ in records[0])
    assert header == NAMES, f"{key} has the header {header}"
    rows = []
    for number, record in enumerate(records[1:], start=2):
        assert len(record) == len(COLUMNS), f"{key} line {number} has {len(record)} fields"
        rows.append(
            tuple(
                _csv_value(text, quoted, name, kind)
                for (text, quoted), (name, kind) in zip(record, COLUMNS, strict=True)
            )
        )
    return rows


READERS = {"parquet": parquet_rows, "csv": csv_rows}


# --- Comparing ------------------------------------------------------------------------------


def _comparable(row: Row) -> Row:
    """NaN equals NaN here; every other value compares with ==, so floats exactly."""
    return tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in row)


def describe(row: Row) -> dict[str, Any]:
    """A row as a reader would name it, for failure messages."""
    stamp = EPOCH + timedelta(microseconds=row[0])
    return {
        "timestamp": f"{stamp:%Y-%m-%dT%H:%M:%S.%fZ}",
        **dict(zip(NAMES[1:], row[1:], strict=True)),
    }


def _assert_same_rows(where: str, exported: list[Row], expected: list[Row], unique: bool) -> None:
    have, want = Counter(map(_comparable, exported)), Counter(map(_comparable, expected))
    missing, extra = list((want - have).elements()), list((have - want).elements())
    assert not missing and not extra, (
        f"{where}: S3 holds {len(exported)} rows, InfluxDB {len(expected)}; "
        f"{len(missing)} missing from S3 (first: {[describe(r) for r in missing[:3]]}), "
        f"{len(extra)} not in InfluxDB (first: {[describe(r) for r in extra[:3]]})"
    )
    if unique:
        twice = [key for key, n in Counter((row[1], row[0]) for row in exported).items() if n > 1]
        assert not twice, f"{where}: (device_id, timestamp) twice: {twice[:3]}"


def _assert_sorted(key: str, rows: Sequence[Row]) -> None:
    stamps = [row[0] for row in rows]
    assert stamps == sorted(stamps), f"{key}: rows are not sorted by timestamp"


@dataclass(frozen=True)
class SliceObject:
    key: str
    offset: int  # the slice start its name stands for, in seconds after midnight
    rows: list[Row]


_SLICE_NAME = re.compile(r"export_(\d\d)(\d\d)(\d\d)\.(\w+)")


def read_slice_objects(client: Any, bucket: str, folder: str, fmt: str) -> list[SliceObject]:
    """Every object of the folder, each of which must be a slice file of format `fmt`."""
    found = []
    for key in _keys_under(client, bucket, folder):
        name = key[len(folder) :]
        match = _SLICE_NAME.fullmatch(name)
        assert match and match.group(4) == fmt, (
            f"{key} does not belong in the folder: not a slice file export_HHMMSS.{fmt}"
        )
        hours, minutes, seconds = (int(part) for part in match.groups()[:3])
        assert hours < 24 and minutes < 60 and seconds < 60, f"{key} names no time of day"
        offset = hours * 3600 + minutes * 60 + seconds
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        found.append(SliceObject(key, offset, READERS[fmt](body, key)))
    return found


def _assert_slices(objects: list[SliceObject], day: date, interval: int | None) -> None:
    """Each object is named for a slice start, holds rows, sorted, and only rows of its slice.

    With `interval` None the slice length is not known, and the longest one the names allow is
    taken (the greatest common divisor of the day and the slice starts): rows outside it are
    in the wrong file whatever the slice length was.
    """
    length = interval or math.gcd(SECONDS_PER_DAY, *(item.offset for item in objects))
    midnight = int((datetime(day.year, day.month, day.day, tzinfo=UTC) - EPOCH).total_seconds())
    for item in objects:
        assert item.offset % length == 0, f"{item.key} is not named for a {length} s slice start"
        assert item.rows, f"{item.key} holds no rows: a slice without rows has no object"
        _assert_sorted(item.key, item.rows)
        start = (midnight + item.offset) * US_PER_SECOND
        end = start + length * US_PER_SECOND
        strays = [row for row in item.rows if not start <= row[0] < end]
        assert not strays, (
            f"{item.key} holds rows outside its {length} s slice: "
            f"{[describe(row) for row in strays[:3]]}"
        )


def assert_reconciled(
    stack: Stack,
    device_id: str,
    days: Iterable[date],
    unique: bool = True,
    *,
    settings: Settings | None = None,
) -> int:
    """For each device-day: the S3 folder holds exactly InfluxDB's rows, value by value, each in
    the slice file it belongs to, and (when the data has one series per device) no
    (device_id, timestamp) twice. Returns the rows compared.

    `settings` says where and how the export was written (InfluxDB, bucket, prefix, format,
    layout, slice length). Without it, the stack's own settings are used, except for the slice
    length: `stack.settings()` knows the stack's defaults (300 s), not the overrides a test
    exported with (60 s in test_sensors, 10 s for the live daemons), so the longest slice length
    the object names allow is taken instead; pass `settings` for the exact check.
    """
    interval = settings.export.interval_seconds if settings is not None else None
    settings = settings if settings is not None else stack.settings()
    client = _s3_client(settings)
    total = 0
    for day in days:
        where = f"{day}|{device_id}"
        expected = influx_rows(settings.influx, device_id, day)
        folder = device_day_folder(settings.s3.prefix, device_id, day, settings.export.layout)
        objects = read_slice_objects(client, settings.s3.bucket, folder, settings.export.format)
        _assert_slices(objects, day, interval)
        exported = [row for item in objects for row in item.rows]
        _assert_same_rows(where, exported, expected, unique)
        total += len(exported)
    return total


def assert_day_file_reconciled(
    stack: Stack,
    device_id: str,
    days: Iterable[date],
    unique: bool = True,
    *,
    daily_prefix: str,
    settings: Settings | None = None,
) -> int:
    """The closed-day dataset: for each device-day with rows in InfluxDB, exactly one Parquet
    object at `{daily_prefix}/device_id={id}/date={YYYY-MM-DD}/<name>.parquet` holding exactly
    InfluxDB's rows in the 12 columns, sorted by timestamp; for a day without rows, no object
    at all. Returns the rows compared. `settings` gives InfluxDB and the bucket (default: the
    stack's)."""
    settings = settings if settings is not None else stack.settings()
    client = _s3_client(settings)
    total = 0
    for day in days:
        where = f"{day}|{device_id}"
        expected = influx_rows(settings.influx, device_id, day)
        folder = device_day_folder(daily_prefix, device_id, day, "hive")
        keys = _keys_under(client, settings.s3.bucket, folder)
        if not expected:
            assert not keys, f"{where}: InfluxDB has no rows, but S3 holds {keys}"
            continue
        assert len(keys) == 1, f"{where}: {len(keys)} objects in {folder}, not one: {keys}"
        key = keys[0]
        name = key[len(folder) :]
        assert name.endswith(".parquet") and "/" not in name, f"{key} is not a .parquet file"
        body = client.get_object(Bucket=settings.s3.bucket, Key=key)["Body"].read()
        exported = parquet_rows(body, key)
        _assert_sorted(key, exported)
        _assert_same_rows(where, exported, expected, unique)
        total += len(exported)
    return total
