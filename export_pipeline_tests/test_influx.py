"""The reader against a real InfluxDB 1.6 server."""

from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from typing import Any

import pyarrow as pa
import pytest

from export_pipeline.engine.grid import DayRange, day_bounds_ns, days_closed_by
from export_pipeline.engine.influx import (
    InfluxError,
    InfluxSource,
    InfluxUnavailable,
    SharedReads,
    device_query,
    quote_string,
    shared_count_groups,
    shared_read_groups,
)
from export_pipeline.engine.schema import SOURCE_SCHEMA
from export_pipeline.settings import InfluxSettings
from export_pipeline_tests.conftest import Stack
from export_pipeline_tests.services import free_port, point

T0 = 1_770_465_600_000_000_000  # 2026-02-07T12:00:00Z
DAY = date(2026, 2, 7)
NS = 1_000_000_000


def source_for(stack: Stack) -> InfluxSource:
    return InfluxSource(stack.settings().influx)


def read_all(source: InfluxSource, device_id: str, batch_rows: int = 50_000) -> pa.Table:
    batches = list(
        source.read(
            device_id, start_ns=T0 - 86_400 * NS, end_ns=T0 + 86_400 * NS, batch_rows=batch_rows
        )
    )
    return pa.Table.from_batches(batches, schema=SOURCE_SCHEMA)


def test_whole_number_floats_come_back_as_float64(stack: Stack) -> None:
    stack.write([point(T0, "D1", {"voltage": 230.0, "current": 1.0, "power": 230.0})])
    table = read_all(source_for(stack), "D1")
    assert table.schema == SOURCE_SCHEMA
    assert table.to_pylist() == [
        {
            "time": T0,
            "device_type": "bulb",
            "location": "lab",
            "voltage": 230.0,
            "current": 1.0,
            "power": 230.0,
            "temperature": None,
        }
    ]


def test_a_device_without_points_reads_as_no_batches(stack: Stack) -> None:
    stack.write([point(T0, "D1", {"voltage": 1.0})])
    assert read_all(source_for(stack), "D2").num_rows == 0


def test_the_time_range_is_half_open(stack: Stack) -> None:
    stack.write([point(T0 + i * NS, "D1", {"voltage": float(i)}) for i in range(3)])
    rows = list(source_for(stack).read("D1", start_ns=T0, end_ns=T0 + 2 * NS))
    assert pa.Table.from_batches(rows).column("voltage").to_pylist() == [0.0, 1.0]


def test_large_reads_stream_in_many_batches_in_time_order(stack: Stack) -> None:
    stack.write([point(T0 + i * NS, "D1", {"voltage": float(i)}) for i in range(20_000)])
    batches = list(
        source_for(stack).read("D1", start_ns=T0, end_ns=T0 + 86_400 * NS, batch_rows=1_000)
    )
    assert len(batches) > 5
    times = pa.Table.from_batches(batches).column("time").to_pylist()
    assert times == sorted(times) and len(times) == 20_000


@pytest.mark.parametrize("device_id", ["温度计-1", "it's", 'say "hi"', "back\\slash", "a,b c=d"])
def test_odd_but_valid_device_ids_read_exactly_their_own_points(
    stack: Stack, device_id: str
) -> None:
    stack.write([point(T0, device_id, {"voltage": 1.0}), point(T0, "other", {"voltage": 2.0})])
    assert read_all(source_for(stack), device_id).column("voltage").to_pylist() == [1.0]


@pytest.mark.parametrize(
    "hostile",
    [
        "x' OR \"device_id\"::tag = 'D1",
        "x' OR time > 0 OR 'a'='a",
        "x\\' OR 'a'='a",
        "x'\nSELECT * FROM telemetry; --",
        'x\'; DROP DATABASE "victim"; --',
    ],
)
def test_a_hostile_device_id_cannot_change_the_query(stack: Stack, hostile: str) -> None:
    stack.write([point(T0, "D1", {"voltage": 1.0})])
    stack.influx.create_database("victim")
    assert read_all(source_for(stack), hostile).num_rows == 0
    databases = stack.influx.query("SHOW DATABASES")
    assert "victim" in str(databases)


def test_quoted_strings_escape_quotes_backslashes_and_newlines() -> None:
    assert quote_string("a'b\\c\nd") == "'a\\'b\\\\c\\nd'"
    query = device_query(measurement='tele"metry', device_id="x'", start_ns=0, end_ns=10)
    assert '"tele\\"metry"' in query and "'x\\''" in query


def test_a_missing_database_is_named_in_the_error(stack: Stack) -> None:
    source = InfluxSource(InfluxSettings(url=stack.influx.url, bucket="no_such_bucket"))
    with pytest.raises(InfluxError, match="INFLUXDB_BUCKET='no_such_bucket'"):
        source.check()


def test_an_unreachable_server_is_a_retryable_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    source = InfluxSource(InfluxSettings(url=url, bucket="x", timeout_seconds=2))
    with pytest.raises(InfluxUnavailable, match=f"INFLUXDB_URL={url} is unreachable"):
        source.check()


def test_field_counts_are_per_device_and_field_within_the_range(stack: Stack) -> None:
    stack.write(
        [
            point(T0 - NS, "D1", {"voltage": 1.0}),  # before the range
            point(T0, "D1", {"voltage": 1.0, "power": 2.0}),
            point(T0, "D1", {"current": 1.0}, location="roof"),  # same instant, another series
            point(T0 + 59 * NS, "it's, D2", {"temperature": 20.0}),
            point(T0 + 60 * NS, "D1", {"voltage": 1.0}),  # the range's end is excluded
        ]
    )
    counts = source_for(stack).field_counts(start_ns=T0, end_ns=T0 + 60 * NS)
    assert counts == {
        "D1": {"voltage": 1, "current": 1, "power": 1, "temperature": 0},
        "it's, D2": {"voltage": 0, "current": 0, "power": 0, "temperature": 1},
    }
    assert source_for(stack).field_counts(start_ns=T0 + 61 * NS, end_ns=T0 + 120 * NS) == {}


ODD_IDS = ["温度计-1", "it's", 'say "hi"', "back\\slash", "a,b c=d", "D1"]


def write_odd_ids(stack: Stack, **fields: float) -> None:
    """A minute of ODD_IDS at various rates, D1 in two series, and a device no test asks for."""
    points = [
        point(T0 + i * NS, device_id, {"voltage": float(i), "power": float(n)})
        for n, device_id in enumerate(ODD_IDS)
        for i in range(0, 60, 1 + n)
    ]
    points.append(point(T0 + 5 * NS, "D1", fields, location="yard"))  # a second series
    points.append(point(T0 + 5 * NS, "not-asked", {"voltage": 1.0}))
    stack.write(points)


def test_a_shared_read_gives_each_device_exactly_what_its_own_read_gives(stack: Stack) -> None:
    write_odd_ids(stack, voltage=9.0)
    source = source_for(stack)
    shared = source.read_many([*ODD_IDS, "silent"], start_ns=T0, end_ns=T0 + 60 * NS)
    assert set(shared) == {*ODD_IDS, "silent"} and shared["silent"].num_rows == 0
    for device_id in ODD_IDS:
        own = pa.Table.from_batches(
            list(source.read(device_id, start_ns=T0, end_ns=T0 + 60 * NS)), SOURCE_SCHEMA
        )
        assert own.num_rows > 0 and shared[device_id].equals(own), device_id


def test_shared_reads_query_once_per_group_and_fall_back_per_device_on_failure(
    stack: Stack,
) -> None:
    devices = [f"G{n}" for n in range(4)]
    stack.write([point(T0, device_id, {"power": 1.0}) for device_id in devices])
    span = (T0, T0 + 60 * NS)
    shared = SharedReads(
        RefusesG3(stack.settings().influx), [(devices[:2], *span), (devices[2:], *span)]
    )

    def rows(device_id: str) -> int:
        return sum(b.num_rows for b in shared.read(device_id, start_ns=span[0], end_ns=span[1]))

    assert rows("G0") == 1 and rows("G1") == 1 and shared.shared_queries == 1
    assert rows("G0") == 1 and shared.shared_queries == 1  # read again (a retry): on its own
    assert rows("G2") == 1 and shared.fallbacks == 1  # G3 spoiled its group: each reads alone
    with pytest.raises(InfluxError, match="G3 cannot be read"):
        rows("G3")


class RefusesG3(InfluxSource):
    """A source whose every read of device G3 fails (one bad device in a shared group)."""

    def _stream(self, device_ids: Sequence[str], **kwargs: Any) -> Iterator[pa.RecordBatch]:
        if "G3" in device_ids:
            raise InfluxError("G3 cannot be read")
        return super()._stream(device_ids, **kwargs)


def test_shared_read_groups_share_a_range_and_stay_within_their_bounds() -> None:
    minute = (T0, T0 + 60 * NS)
    pieces = {f"d{n:03d}": minute for n in range(120)}
    pieces["late"] = (T0 - 60 * NS, T0 + 60 * NS)
    pieces["backlog"] = (T0 - 86_400 * NS, T0)
    pieces["backlog2"] = (T0 - 86_400 * NS, T0)
    groups = shared_read_groups(pieces)
    assert [len(group) for group, *_ in groups] == [50, 50, 20]  # one-device groups: no sharing
    assert all((start, end) == minute for _, start, end in groups)
    assert sorted(d for group, *_ in groups for d in group) == sorted(
        d for d in pieces if pieces[d] == minute
    )
    long_ids = {"x" * 1000 + str(n): minute for n in range(10)}
    assert all(len(group) <= 6 for group, *_ in shared_read_groups(long_ids))


def test_a_shared_count_gives_each_device_exactly_what_its_own_count_gives(stack: Stack) -> None:
    write_odd_ids(stack, current=9.0)
    source, span = source_for(stack), (T0, T0 + 60 * NS)
    devices = [*ODD_IDS, "silent"]
    shared = SharedReads(source, counts=[(devices, *span)])
    for device_id in devices:
        own = source.field_counts(start_ns=span[0], end_ns=span[1], device_id=device_id)
        mine = shared.field_counts(start_ns=span[0], end_ns=span[1], device_id=device_id)
        zeros = dict.fromkeys(["voltage", "current", "power", "temperature"], 0)
        assert mine[device_id] == own.get(device_id, zeros), device_id
    assert shared.shared_queries == 1 and shared.fallbacks == 0
    assert own == {} and mine == {"silent": zeros}  # a device without points counted none
    # Asked again (a day exported again, a retry): counted on its own, afresh.
    before = source.field_counts(start_ns=span[0], end_ns=span[1], device_id="D1")["D1"]
    stack.write([point(T0 + 7 * NS, "D1", {"voltage": 1.0})])
    again = shared.field_counts(start_ns=span[0], end_ns=span[1], device_id="D1")
    assert again["D1"] == {**before, "voltage": before["voltage"] + 1}
    assert shared.shared_queries == 1


def test_shared_count_groups_group_the_days_a_run_closes_within_their_bounds() -> None:
    day, next_day = DayRange.whole(DAY), DayRange.whole(DAY + timedelta(days=1))
    ranges = {f"d{n:03d}": [day, next_day] for n in range(450)}
    ranges["open"] = [DayRange(DAY, 0, 3600)]  # not closed: not counted
    ranges["closing"] = [DayRange(DAY, 82_800, 86_400)]  # closes its day
    closed = days_closed_by(ranges)
    assert ("open", *day_bounds_ns(DAY)) not in closed
    assert ("closing", *day_bounds_ns(DAY)) in closed and len(closed) == 901
    groups = shared_count_groups(closed)
    sizes = {start: [len(g) for g, s, _ in groups if s == start] for _, start, _ in groups}
    assert sizes == {
        day_bounds_ns(DAY)[0]: [199, 200, 52],
        day_bounds_ns(next_day.day)[0]: [200] * 2 + [50],
    }
    for group, *_ in groups:  # at most 200 devices, and 6,000 characters of query
        assert len(group) <= 200 and sum(len(quote_string(d)) + 24 for d in group) <= 6_000
    assert sorted((d, s, e) for group, s, e in groups for d in group) == sorted(closed)
    long_ids = [("x" * 1000 + str(n), *day_bounds_ns(DAY)) for n in range(10)]
    assert all(len(group) <= 6 for group, *_ in shared_count_groups(long_ids))
