"""InfluxDB reader: InfluxQL on the v1 `/query` endpoint, streamed as CSV into Arrow record batches.

`/query` with `Accept: application/csv` is served by InfluxDB 1.x, 2.x (v1 compatibility, token
auth, bucket as database) and 3.x, and chunked CSV was the fastest read measured (~149k rows/s on
1.6.7, against 93-129k for JSON). The CSV answer carries no error for a missing database (just an
empty body), so `check()` asks once in JSON before reading.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import requests
import requests.adapters

from export_pipeline.engine.schema import (
    SEED_COLUMNS,
    Columns,
    ColumnsError,
    constant,
    plan_columns,
)
from export_pipeline.settings import InfluxSettings, listed

_RESPONSE_CHUNK = 1 << 20


class InfluxError(RuntimeError):
    """InfluxDB could not answer as asked; the message names the setting to look at."""


class InfluxUnavailable(InfluxError):
    """A transient failure (connection refused, timeout, 5xx): worth retrying."""


def quote_string(value: str) -> str:
    """An InfluxQL string literal: nothing inside it can end the literal or add a clause."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def quote_identifier(name: str) -> str:
    """An InfluxQL double-quoted identifier, escaped the same way."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def alias(position: int) -> str:
    """The name a query gives the answer's column at `position` (after time): InfluxDB's CSV
    header names a column as selected, unquoted, so a field named `a,b` or `"x"` would break it;
    the reader renames the columns back."""
    return f"c{position}"


def read_schema(columns: Columns, *, shared: bool) -> pa.Schema:
    """The answer of a read: time, then (shared) the device, the tags and the fields."""
    schema = columns.source_schema
    return schema.insert(1, pa.field("device_id", pa.string())) if shared else schema


def device_query(
    *, measurement: str, device_id: str, start_ns: int, end_ns: int, columns: Columns = SEED_COLUMNS
) -> str:
    """One device's points in `[start_ns, end_ns)`, tags and fields as columns, oldest first."""
    return devices_query(
        measurement=measurement,
        device_ids=[device_id],
        start_ns=start_ns,
        end_ns=end_ns,
        columns=columns,
    )


def devices_query(
    *,
    measurement: str,
    device_ids: Sequence[str],
    start_ns: int,
    end_ns: int,
    columns: Columns = SEED_COLUMNS,
) -> str:
    """These devices' points in `[start_ns, end_ns)`, as `device_query`; `device_id` is a column
    of the answer, so no `GROUP BY` (and no CSV `tags` column) is needed to tell them apart.
    Each column is named by its position (`alias`); a field of a declared widening is cast."""
    if not device_ids:
        raise ValueError("no device to query")
    tags = columns.tags if len(device_ids) == 1 else ("device_id", *columns.tags)
    selected = [f"{quote_identifier(tag)}::tag" for tag in tags]
    selected += [
        f"{quote_identifier(name)}::{kind if name in columns.casts else 'field'}"
        for name, kind in columns.fields
    ]
    aliased = [f"{column} AS {alias(i)}" for i, column in enumerate(selected)]
    return (
        f"SELECT {', '.join(aliased)} FROM {quote_identifier(measurement)} "
        f"WHERE {_device_match(device_ids)}time >= {int(start_ns)} AND time < {int(end_ns)}"
    )


def counts_query(
    measurement: str,
    *,
    start_ns: int,
    end_ns: int,
    device_ids: Sequence[str] = (),
    fields: Sequence[str] = SEED_COLUMNS.field_names,
    condition: str = "",
) -> str:
    """Every device's (or these devices') non-null count of each exported field in
    `[start_ns, end_ns)` (and `condition`, which starts with AND), each named by its position
    (`alias`)."""
    columns = [f"count({quote_identifier(n)}) AS {alias(i)}" for i, n in enumerate(fields)]
    return (
        f"SELECT {', '.join(columns)} FROM {quote_identifier(measurement)} "
        f"WHERE {_device_match(device_ids)}time >= {int(start_ns)} AND time < {int(end_ns)}"
        f'{condition} GROUP BY "device_id"'
    )


def _device_match(device_ids: Sequence[str]) -> str:
    """The condition on `device_id` that starts a WHERE clause; none for no device."""
    if not device_ids:
        return ""
    match = " OR ".join(f'"device_id"::tag = {quote_string(d)}' for d in device_ids)
    return f"({match}) AND " if len(device_ids) > 1 else f"{match} AND "


def columns_of(influx: InfluxSettings, answer: Callable[[str], list[list[Any]]]) -> Columns:
    """The columns to export (`schema.plan_columns`), with what InfluxDB lists: its field keys
    with their types, and its tag keys where EXPORT_TAGS is `*`. `answer(query)` gives the rows
    of a SHOW query's one series."""
    measurement = quote_identifier(influx.measurement)
    field_keys = [(str(n), str(k)) for n, k in answer(f"SHOW FIELD KEYS FROM {measurement}")]
    tag_keys = (
        [str(row[0]) for row in answer(f"SHOW TAG KEYS FROM {measurement}")]
        if listed(influx.tags) is None
        else []
    )
    return plan_columns(influx, field_keys=field_keys, tag_keys=tag_keys)


class _ChunkStream(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, for pyarrow's streaming CSV reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class Source(Protocol):
    """What an export reads from: one device's points in `[start_ns, end_ns)`, by time, as
    `columns.source_schema` batches."""

    @property
    def columns(self) -> Columns: ...

    def read(
        self, device_id: str, *, start_ns: int, end_ns: int, batch_rows: int = ...
    ) -> Iterator[pa.RecordBatch]: ...


class CountingSource(Source, Protocol):
    """A source that can also count the values of each field, without reading them."""

    def field_counts(
        self,
        *,
        start_ns: int,
        end_ns: int,
        device_id: str | None = None,
        timeout_seconds: float | None = None,
    ) -> dict[str, dict[str, int]]: ...


class InfluxSource:
    """Reads one device's telemetry for a time range as record batches of its `columns`."""

    def __init__(self, settings: InfluxSettings, connections: int = 10) -> None:
        self.settings = settings
        self._columns: Columns | None = None
        self._refused: str | None = None
        self._columns_lock = threading.Lock()
        self.session = requests.Session()
        # One pooled connection per concurrent reader, so parallel exports do not reconnect.
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if settings.token:
            self.session.headers["Authorization"] = f"Token {settings.token}"
        elif settings.username:
            self.session.auth = (settings.username, settings.password)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> InfluxSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(
        self,
        params: dict[str, str],
        accept: str,
        stream: bool = False,
        timeout: float | None = None,
    ) -> requests.Response:
        url = f"{self.settings.url}/query"
        timeout = max(timeout or 0.0, self.settings.timeout_seconds)
        try:
            response = self.session.get(
                url,
                params={"db": self.settings.bucket, **params},
                headers={"Accept": accept},
                stream=stream,
                timeout=timeout,
            )
        except requests.ConnectionError as error:
            raise InfluxUnavailable(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} is unreachable: "
                f"{type(error).__name__}"
            ) from error
        except requests.Timeout as error:
            raise InfluxUnavailable(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} did not answer within "
                f"{timeout:g} s (INFLUXDB_TIMEOUT_SECONDS={self.settings.timeout_seconds:g})"
            ) from error
        if response.status_code in (401, 403):
            response.close()
            how = "INFLUXDB_TOKEN" if self.settings.token else "INFLUXDB_USERNAME/INFLUXDB_PASSWORD"
            raise InfluxError(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} refused the credentials "
                f"({response.status_code}); check {how}"
            )
        if response.status_code == 404:
            response.close()
            raise InfluxError(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} has no database or bucket "
                f"INFLUXDB_BUCKET={self.settings.bucket!r} (404)"
            )
        if response.status_code >= 500:
            response.close()
            raise InfluxUnavailable(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} failed with "
                f"{response.status_code}: {response.headers.get('X-Influxdb-Error', '')}"
            )
        if response.status_code != 200:
            detail = response.headers.get("X-Influxdb-Error") or response.text[:300]
            response.close()
            raise InfluxError(f"InfluxDB rejected the query ({response.status_code}): {detail}")
        return response

    def check(self) -> None:
        """Fail early and by name when the database or measurement is missing."""
        measurement = quote_identifier(self.settings.measurement)
        answer = self._get({"q": f"SHOW FIELD KEYS FROM {measurement}"}, "application/json")
        results = answer.json().get("results") or [{}]
        error = results[0].get("error")
        if error and "database not found" in error:
            raise InfluxError(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} has no database "
                f"INFLUXDB_BUCKET={self.settings.bucket!r} ({error})"
            )
        if error:
            raise InfluxError(f"InfluxDB could not list the fields of {measurement}: {error}")
        if not results[0].get("series"):
            raise InfluxError(
                f"INFLUXDB_MEASUREMENT={self.settings.measurement!r} does not exist in "
                f"INFLUXDB_BUCKET={self.settings.bucket!r} at INFLUXDB_URL={self.settings.url}"
            )

    @property
    def columns(self) -> Columns:
        """What this source reads and exports, asked of InfluxDB once (the first read of a run):
        a field that appears later is in the next run's columns."""
        with self._columns_lock:
            if self._columns is None:
                if self._refused is not None:  # every device of the run fails alike, asked once
                    raise InfluxError(self._refused)
                try:
                    self._columns = columns_of(self.settings, self._show)
                except ColumnsError as error:
                    self._refused = str(error)
                    raise InfluxError(self._refused) from error
            return self._columns

    def _show(self, query: str) -> list[list[Any]]:
        answer = self._get({"q": query}, "application/json").json()
        result = (answer.get("results") or [{}])[0]
        if result.get("error"):
            raise InfluxError(f"InfluxDB could not answer {query}: {result['error']}")
        return [row for series in result.get("series", []) for row in series["values"]]

    def device_ids(self, since_ns: int) -> list[str]:
        """Every device_id tag value, limited to points since `since_ns` where the server can
        (InfluxDB 1.x ignores the time bound in SHOW TAG VALUES and lists every series)."""
        measurement = quote_identifier(self.settings.measurement)
        query = (
            f'SHOW TAG VALUES FROM {measurement} WITH KEY = "device_id" WHERE time >= {since_ns}'
        )
        answer = self._get({"q": query}, "application/json").json()
        result = (answer.get("results") or [{}])[0]
        if result.get("error"):
            raise InfluxError(f"InfluxDB could not list the device ids: {result['error']}")
        return sorted(
            {str(row[1]) for series in result.get("series", []) for row in series["values"]}
        )

    def field_counts(
        self,
        *,
        start_ns: int,
        end_ns: int,
        device_id: str | None = None,
        timeout_seconds: float | None = None,
    ) -> dict[str, dict[str, int]]:
        """Each device's count of values per exported field in `[start_ns, end_ns)`: one
        aggregate query for the whole fleet (or one device), a fingerprint that grows with every
        late point. It scans every point of the range, so it may be given longer than other
        queries."""
        devices = () if device_id is None else [device_id]
        return self._counts(devices, start_ns=start_ns, end_ns=end_ns, timeout=timeout_seconds)

    def field_counts_of(
        self, device_ids: Sequence[str], *, start_ns: int, end_ns: int
    ) -> dict[str, dict[str, int]]:
        """`field_counts` of these devices, with one query; a device without points in the
        range is not in the answer."""
        counts = self._counts(device_ids, start_ns=start_ns, end_ns=end_ns, timeout=None)
        if not counts.keys() <= set(device_ids):
            raise InfluxError("InfluxDB counted points of devices that were not asked for")
        return counts

    def _counts(
        self, device_ids: Sequence[str], *, start_ns: int, end_ns: int, timeout: float | None
    ) -> dict[str, dict[str, int]]:
        """One count of every field, and one more per string field counting its non-empty
        values: InfluxDB's CSV writes an empty string as it writes a missing value, so the
        export holds "" as null, and only those are what it can be reconciled with."""
        columns = self.columns
        names = columns.field_names
        strings = [name for name, kind in columns.fields if kind == "string"]
        queries = [(names, "")] + [
            ((name,), f" AND {quote_identifier(name)} != ''") for name in strings
        ]
        counts: dict[str, dict[str, int]] = {}
        for fields, condition in queries:
            query = counts_query(
                self.settings.measurement,
                start_ns=start_ns,
                end_ns=end_ns,
                device_ids=device_ids,
                fields=fields,
                condition=condition,
            )
            answer = self._get({"q": query}, "application/json", timeout=timeout).json()
            result = (answer.get("results") or [{}])[0]
            if result.get("error"):
                raise InfluxError(f"InfluxDB could not count the fields: {result['error']}")
            for series in result.get("series", []):
                device_id = str(series.get("tags", {}).get("device_id", ""))
                if not device_id:
                    continue
                row = dict(zip(series["columns"], series["values"][0], strict=True))
                mine = counts.setdefault(device_id, dict.fromkeys(names, 0))
                for i, name in enumerate(fields):
                    if condition or name not in strings:
                        mine[name] = int(row.get(alias(i)) or 0)
        return counts

    def read(
        self, device_id: str, *, start_ns: int, end_ns: int, batch_rows: int = 50_000
    ) -> Iterator[pa.RecordBatch]:
        """Stream the device's points in `[start_ns, end_ns)`, sorted by time.

        Memory stays bounded by roughly `batch_rows` rows whatever the size of the range.
        """
        return self._stream([device_id], start_ns=start_ns, end_ns=end_ns, batch_rows=batch_rows)

    def read_many(
        self, device_ids: Sequence[str], *, start_ns: int, end_ns: int
    ) -> dict[str, pa.Table]:
        """Every one of these devices' points in `[start_ns, end_ns)`, with one query, split by
        device (each device's rows in time order). Held in memory: for short ranges."""
        if len(device_ids) < 2:
            raise ValueError("a shared read is for two devices or more")
        batches = list(self._stream(device_ids, start_ns=start_ns, end_ns=end_ns))
        table = pa.Table.from_batches(batches, read_schema(self.columns, shared=True))
        found = {}
        for device_id in device_ids:
            mine = table.filter(pc.equal(table["device_id"], constant(device_id, pa.string())))
            found[device_id] = mine.drop_columns(["device_id"])
        if sum(part.num_rows for part in found.values()) != table.num_rows:
            raise InfluxError("InfluxDB answered with points of devices that were not asked for")
        return found

    def _stream(
        self, device_ids: Sequence[str], *, start_ns: int, end_ns: int, batch_rows: int = 50_000
    ) -> Iterator[pa.RecordBatch]:
        columns = self.columns
        query = devices_query(
            measurement=self.settings.measurement,
            device_ids=device_ids,
            start_ns=start_ns,
            end_ns=end_ns,
            columns=columns,
        )
        params = {"q": query, "epoch": "ns", "chunked": "true", "chunk_size": "10000"}
        response = self._get(params, "application/csv", stream=True)
        try:
            chunks = response.iter_content(_RESPONSE_CHUNK)
            first = next(chunks, b"")
            if not first:  # an empty result is an empty body, which the CSV reader rejects
                return
            # Buffered, so the CSV reader gets whole blocks rather than network-sized pieces
            # (which made batches of a few hundred rows and multiplied per-batch costs).
            stream = io.BufferedReader(_ChunkStream(_chain(first, chunks)), _RESPONSE_CHUNK)
            schema = read_schema(columns, shared=len(device_ids) > 1)
            strings = any(kind == "string" for _, kind in columns.fields)
            yield from _parse_csv(stream, batch_rows, schema, newlines=strings)
        except requests.RequestException as error:
            raise InfluxUnavailable(
                f"InfluxDB at INFLUXDB_URL={self.settings.url} broke off the answer: "
                f"{type(error).__name__}"
            ) from error
        finally:
            response.close()


# A shared read holds its answer in memory until each device takes its part: bounded by devices
# times seconds (50 devices of 1 Hz for 10 minutes: 30k rows, a few MB), and by the query's length.
SHARED_READ_DEVICES = 50
SHARED_READ_DEVICE_SECONDS = 30_000
SHARED_READ_QUERY_CHARS = 6_000
# A shared count answers with a row per device, whatever the range: bounded by the query's length
# (and a device count, so one slow group costs little when it falls back to a query per device).
SHARED_COUNT_DEVICES = 200


def shared_read_groups(
    pieces: Mapping[str, tuple[int, int]],
) -> list[tuple[list[str], int, int]]:
    """Group devices due for the same `(start_ns, end_ns)` into shared reads: each group is one
    query, within the bounds above. Devices keep their sorted order, so a group's members are
    exported one after the other and its answer is held briefly."""

    def most(seconds: int) -> int:
        return max(1, min(SHARED_READ_DEVICES, SHARED_READ_DEVICE_SECONDS // seconds))

    return _groups(((device, *piece) for device, piece in pieces.items()), most)


def shared_count_groups(ranges: Iterable[tuple[str, int, int]]) -> list[tuple[list[str], int, int]]:
    """Group `(device, start_ns, end_ns)` ranges to reconcile into shared counts, one query each
    (`SharedReads.field_counts`), as `shared_read_groups` groups reads."""
    return _groups(ranges, lambda seconds: SHARED_COUNT_DEVICES)


def _groups(
    ranges: Iterable[tuple[str, int, int]], most: Callable[[int], int]
) -> list[tuple[list[str], int, int]]:
    """Devices of the same range, in sorted order, in groups of at most `most(seconds)` devices
    and SHARED_READ_QUERY_CHARS of query; groups of one are left out (nothing to share)."""
    by_range: dict[tuple[int, int], list[str]] = {}
    for device_id, start_ns, end_ns in sorted(set(ranges)):
        by_range.setdefault((start_ns, end_ns), []).append(device_id)
    groups = []
    for (start_ns, end_ns), devices in by_range.items():
        limit = most(max(1, (end_ns - start_ns) // 1_000_000_000))
        group: list[str] = []
        length = 0
        for device_id in devices:
            cost = len(quote_string(device_id)) + 24
            if group and (len(group) >= limit or length + cost > SHARED_READ_QUERY_CHARS):
                groups.append((group, start_ns, end_ns))
                group, length = [], 0
            group.append(device_id)
            length += cost
        groups.append((group, start_ns, end_ns))
    return [group for group in groups if len(group[0]) > 1]


class _Shared:
    """One group's answer, fetched once, by whichever member asks first; each member takes its
    part once."""

    def __init__(self, device_ids: list[str]) -> None:
        self.device_ids = device_ids
        self.lock = threading.Lock()
        self.done = False
        self.parts: dict[str, Any] | None = None


class SharedReads:
    """A source that answers each group of `shared_read_groups` with one query, handing each
    device its part, and each group of `shared_count_groups` with one count; every other read
    and count goes to `source` as it is.

    A group whose query fails, and a device reading or counting its range a second time (a
    retry, a day exported again), go on their own instead: one bad device (a string where a
    number belongs, say) still fails alone, by name, and a transient error is retried per device.
    A shared count is taken when the group's first device reconciles, within seconds of the
    others' reads (as near as a count per device is): a point landing in between makes a day
    fail its reconciliation, which exports it again.
    """

    def __init__(
        self,
        source: InfluxSource,
        groups: Iterable[tuple[list[str], int, int]] = (),
        *,
        counts: Iterable[tuple[list[str], int, int]] = (),
    ) -> None:
        self.source = source
        self.shared_queries = 0
        self.fallbacks = 0
        self._reads = self._index(groups)
        self._counts = self._index(counts)

    @staticmethod
    def _index(groups: Iterable[tuple[list[str], int, int]]) -> dict[tuple[str, int, int], _Shared]:
        index = {}
        for device_ids, start_ns, end_ns in groups:
            shared = _Shared(device_ids)
            for device_id in device_ids:
                index[(device_id, start_ns, end_ns)] = shared
        return index

    @property
    def columns(self) -> Columns:
        return self.source.columns

    def field_counts(
        self,
        *,
        start_ns: int,
        end_ns: int,
        device_id: str | None = None,
        timeout_seconds: float | None = None,
    ) -> dict[str, dict[str, int]]:
        if device_id is not None:
            counts = self._take(self._counts, self._count_group, device_id, start_ns, end_ns)
            if counts is not None:
                return {device_id: counts}
        return self.source.field_counts(
            start_ns=start_ns, end_ns=end_ns, device_id=device_id, timeout_seconds=timeout_seconds
        )

    def _count_group(
        self, device_ids: list[str], *, start_ns: int, end_ns: int
    ) -> dict[str, dict[str, int]]:
        counts = self.source.field_counts_of(device_ids, start_ns=start_ns, end_ns=end_ns)
        # A device without points is in no series of the answer: it counted none.
        return {d: counts.get(d, dict.fromkeys(self.columns.field_names, 0)) for d in device_ids}

    def read(
        self, device_id: str, *, start_ns: int, end_ns: int, batch_rows: int = 50_000
    ) -> Iterator[pa.RecordBatch]:
        table = self._take(self._reads, self.source.read_many, device_id, start_ns, end_ns)
        if table is None:
            yield from self.source.read(
                device_id, start_ns=start_ns, end_ns=end_ns, batch_rows=batch_rows
            )
        else:
            yield from (b for b in table.to_batches(max_chunksize=batch_rows) if b.num_rows)

    def _take(
        self,
        index: dict[tuple[str, int, int], _Shared],
        fetch: Callable[..., dict[str, Any]],
        device_id: str,
        start_ns: int,
        end_ns: int,
    ) -> Any:
        """The device's part of its group's answer (fetched now if it is the first to ask), or
        None: not in a group, asked before, or the group's query failed."""
        shared = index.get((device_id, start_ns, end_ns))
        if shared is None:
            return None
        with shared.lock:
            if not shared.done:
                shared.done = True
                try:
                    shared.parts = fetch(shared.device_ids, start_ns=start_ns, end_ns=end_ns)
                    self.shared_queries += 1
                except Exception:
                    self.fallbacks += 1  # each device reads (and fails, or not) on its own
            if shared.parts is None:
                return None
            return shared.parts.pop(device_id, None)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _parse_csv(
    stream: io.BufferedIOBase,
    batch_rows: int,
    schema: pa.Schema = SEED_COLUMNS.source_schema,
    *,
    newlines: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Parse InfluxDB's CSV answer, whose columns after `time` are named by position (`alias`),
    into `schema`; a value that is not of its field's type (a field written as a string in some
    shard) fails the read, naming the value, rather than being exported as a null."""
    named = [schema.field(0)] + [f.with_name(alias(i)) for i, f in enumerate(list(schema)[1:])]
    # About 70 bytes a row in InfluxDB's CSV; the block size is what bounds rows per batch.
    block_size = min(max(batch_rows * 80, 1 << 16), 1 << 26)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(
                block_size=block_size, encoding="utf8", use_threads=False
            ),
            # A string field's value may hold a newline (quoted; a tag's never does): only then
            # is the slower parse needed.
            parse_options=pacsv.ParseOptions(newlines_in_values=newlines),
            convert_options=pacsv.ConvertOptions(
                column_types={field.name: field.type for field in named},
                include_columns=[field.name for field in named],
                include_missing_columns=True,
                strings_can_be_null=True,
                true_values=["true"],
                false_values=["false"],
            ),
        )
        for batch in reader:
            if batch.num_rows:
                columns = batch.select([field.name for field in named]).columns
                yield pa.RecordBatch.from_arrays(columns, schema=schema)
    except pa.ArrowInvalid as error:
        raise InfluxError(f"InfluxDB's CSV answer could not be parsed: {error}") from error
