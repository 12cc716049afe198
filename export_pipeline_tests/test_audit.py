"""The audit (audit.py) is independent of the exporter and strict: it passes on real exports in
every format and layout, and fails on every kind of damage to the S3 side."""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import export_pipeline.engine.slice_files
from export_pipeline.engine.files import ExportFile
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.influx import InfluxSource
from export_pipeline.engine.schema import SCHEMA, Columns
from export_pipeline.engine.slice_files import write_slices
from export_pipeline.settings import Settings
from export_pipeline_tests import audit
from export_pipeline_tests.audit import (
    COLUMNS,
    Row,
    SliceObject,
    assert_day_file_reconciled,
    assert_reconciled,
    csv_records,
    device_day_folder,
    expected_row,
    power_factor,
    read_slice_objects,
)
from export_pipeline_tests.conftest import Stack
from export_pipeline_tests.services import point

SATURDAY, MONDAY = date(2026, 2, 7), date(2026, 2, 9)
NS = 1_000_000_000


def at(day: date, hours: int, minutes: int = 0, seconds: int = 0, ns: int = 0) -> int:
    midnight = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * NS
    return midnight + (hours * 3600 + minutes * 60 + seconds) * NS + ns


def awkward_day(day: date) -> list[str]:
    """Points that exercise every rule of the documented Schema table, on `day` and around it."""
    full = {"voltage": 230.0, "current": 0.5, "power": 100.0, "temperature": 21.5}
    return [
        point(at(day, 0), "D1", full),  # exactly at midnight: the day's first slice
        point(at(day, 12), "D1", {"voltage": 0.1 + 0.2, "current": 1 / 3, "power": 0.1}),
        point(
            at(day, 12, 4, 59, 999_999_999), "D1", {"voltage": 231.25, "current": 2, "power": 1e3}
        ),
        point(at(day, 12, 5), "D1", {"voltage": 229, "current": 0.0, "power": 3}, location="roof"),
        point(at(day, 12, 6), "D1", {"voltage": 230, "current": 1, "power": -5}, device_type=""),
        point(at(day, 13), "D1", {"voltage": 1e308, "current": 10, "power": 1}, location=""),
        point(at(day, 14), "D1", {"voltage": 1e-300, "current": 5e-324, "power": 1}),
        point(at(day, 15, 0, 0, 1), "D1", {"temperature": -4.5}),
        # A tag and a field that are not exported.
        f"telemetry,device_id=D1,device_type=fan,floor=3 voltage=230,current=2,power=400,"
        f"humidity=40 {at(day, 16)}",
        point(at(day, 23, 59, 59, 999_999_999), "D1", {"power": 7.25}),
        # Outside the device-day: the day before, the day after, another device.
        point(at(day, 0) - 1, "D1", {"voltage": 1.0}),
        point(at(day, 24), "D1", {"voltage": 2.0}),
        point(at(day, 12, 1), "D2", {"voltage": 3.0}),
    ]


POINTS_PER_DAY = 10


def export_day(stack: Stack, settings: Settings, day: date) -> int:
    """The real exporter, as the asset and the sensor's runs call it."""
    with InfluxSource(settings.influx) as source:
        report = write_slices(
            source,
            stack.store(),
            prefix=settings.s3.prefix,
            device_id="D1",
            piece=DayRange.whole(day),
            settings=settings.export,
        )
    return report.rows


# --- The audit reads docs/datasets.md, not the package ----------------------------------------


def test_the_audit_imports_nothing_of_the_package_but_its_settings() -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(Path(audit.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    package = {name for name in imported if name.split(".")[0] == "export_pipeline"}
    assert package == {"export_pipeline.settings"}


@pytest.mark.parametrize(
    ("power", "voltage", "current", "expected"),
    [
        (100.0, 230.0, 0.5, 100 / 115),
        (1000.0, 231.25, 2.0, 1.0),  # above 1: clipped
        (-5.0, 230.0, 1.0, 0.0),  # below 0: clipped
        (3.0, 229.0, 0.0, None),  # no apparent power
        (3.0, -229.0, 1.0, None),  # negative apparent power
        (None, 230.0, 1.0, None),  # a missing input
        (1.0, 1e308, 10.0, 0.0),  # apparent power overflows to inf: 1/inf is finite
        (1.0, 1e-300, 5e-324, None),  # apparent power underflows to 0
        (1e308, 1e-300, 1e-8, None),  # the ratio overflows: not finite
        (math.nan, 230.0, 1.0, None),
    ],
)
def test_the_audits_power_factor_follows_the_documented_rule(
    power: float | None, voltage: float, current: float, expected: float | None
) -> None:
    assert power_factor(power, voltage, current) == expected


def test_the_audits_expected_row_truncates_nanoseconds_and_derives_from_utc() -> None:
    row = expected_row(
        {"time": at(SATURDAY, 23, 59, 59, 999_999_999), "voltage": 230, "location": None},
        "D1",
    )
    assert row == (
        (at(SATURDAY, 23, 59, 59) + 999_999_000) // 1000,
        "D1",
        None,
        None,
        230.0,
        None,
        None,
        None,
        23,
        5,
        True,
        None,
    )
    assert isinstance(row[4], float)
    assert expected_row({"time": at(MONDAY, 0)}, "D1")[8:11] == (0, 0, False)


def test_the_audits_csv_parser_tells_a_null_from_an_empty_string() -> None:
    text = '"a","b"\n,""\n"say ""hi""\nthere",-0.5\r\n'
    assert csv_records(text) == [
        [("a", True), ("b", True)],
        [("", False), ("", True)],
        [('say "hi"\nthere', True), ("-0.5", False)],
    ]


def test_the_audits_folders_are_the_documented_layout() -> None:
    assert device_day_folder("telemetry", "D1", SATURDAY, "seed") == (
        "telemetry/device_id=D1/date=2026/02/07/"
    )
    assert device_day_folder("a/b", "x=y", SATURDAY, "hive") == "a/b/device_id=x=y/date=2026-02-07/"
    assert device_day_folder("", "D1", SATURDAY, "hive") == "device_id=D1/date=2026-02-07/"


# --- Real exports pass ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["seed", "hive"])
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_real_export_reconciles_in_every_format_and_layout(
    stack: Stack, fmt: str, layout: str
) -> None:
    stack.write(awkward_day(SATURDAY) + awkward_day(MONDAY))
    settings = stack.settings(EXPORT_FORMAT=fmt, EXPORT_LAYOUT=layout)
    assert export_day(stack, settings, SATURDAY) == POINTS_PER_DAY
    assert export_day(stack, settings, MONDAY) == POINTS_PER_DAY
    assert all(key.endswith(f".{fmt}") for key in stack.objects())

    days = [SATURDAY, MONDAY, date(2026, 2, 11)]  # the last without points: no objects
    assert assert_reconciled(stack, "D1", days, settings=settings) == 2 * POINTS_PER_DAY


def test_a_real_export_reconciles_under_another_prefix_and_slice_length(stack: Stack) -> None:
    stack.write(awkward_day(SATURDAY))
    settings = stack.settings(S3_PREFIX="exports/v2", EXPORT_INTERVAL_SECONDS="3600")
    export_day(stack, settings, SATURDAY)
    assert all(key.startswith("exports/v2/device_id=D1/") for key in stack.objects())
    assert assert_reconciled(stack, "D1", [SATURDAY], settings=settings) == POINTS_PER_DAY
    # Audited as 300 s slices, the hour-long ones hold rows outside their slice.
    with pytest.raises(AssertionError, match="outside its 300 s slice"):
        assert_reconciled(stack, "D1", [SATURDAY], settings=stack.settings(S3_PREFIX="exports/v2"))


def test_a_point_with_only_fields_that_are_not_exported_is_no_row(stack: Stack) -> None:
    stack.write(
        [
            f"telemetry,device_id=D1,device_type=fan humidity=40 {at(SATURDAY, 12)}",
            point(at(SATURDAY, 13), "D1", {"temperature": 20.5}),
        ]
    )
    settings = stack.settings()
    assert export_day(stack, settings, SATURDAY) == 1
    assert assert_reconciled(stack, "D1", [SATURDAY], settings=settings) == 1


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_integer_fields_reconcile_as_floats(stack: Stack, fmt: str) -> None:
    # Integer-typed fields (InfluxDB refuses floats beside them in the same shard).
    stack.write(
        [
            f"telemetry,device_id=D1 voltage=230i,current=2i,power=400i {at(SATURDAY, 12)}",
            f"telemetry,device_id=D1 power=-7i,temperature={2**53 + 1}i {at(SATURDAY, 13)}",
        ]
    )
    settings = stack.settings(EXPORT_FORMAT=fmt)
    export_day(stack, settings, SATURDAY)
    assert assert_reconciled(stack, "D1", [SATURDAY], settings=settings) == 2


def test_the_audit_looks_in_the_folder_of_the_settings_it_is_given(stack: Stack) -> None:
    stack.write(awkward_day(SATURDAY))
    export_day(stack, stack.settings(EXPORT_LAYOUT="hive"), SATURDAY)
    with pytest.raises(AssertionError, match="S3 holds 0 rows, InfluxDB 10"):
        assert_reconciled(stack, "D1", [SATURDAY])  # the stack's default: seed


# --- The audit catches a faulty exporter ------------------------------------------------------


class LosesTheLastRow:
    """A reader with a bug: the last row of each answer never arrives."""

    def __init__(self, source: InfluxSource) -> None:
        self.source = source

    @property
    def columns(self) -> Columns:
        return self.source.columns

    def read(
        self, device_id: str, *, start_ns: int, end_ns: int, batch_rows: int = 50_000
    ) -> Iterator[pa.RecordBatch]:
        batches = list(
            self.source.read(device_id, start_ns=start_ns, end_ns=end_ns, batch_rows=batch_rows)
        )
        if batches:
            batches[-1] = batches[-1].slice(0, batches[-1].num_rows - 1)
        yield from batches


def test_the_audit_catches_a_reader_that_loses_a_row(stack: Stack) -> None:
    stack.write(awkward_day(SATURDAY))
    settings = stack.settings()
    with InfluxSource(settings.influx) as source:
        write_slices(
            LosesTheLastRow(source),
            stack.store(),
            prefix=settings.s3.prefix,
            device_id="D1",
            piece=DayRange.whole(SATURDAY),
            settings=settings.export,
        )
    with pytest.raises(AssertionError, match="1 missing from S3"):
        assert_reconciled(stack, "D1", [SATURDAY], settings=settings)


def test_the_audit_catches_a_transform_that_does_not_clip_the_power_factor(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_pipeline.engine.slice_files.to_export

    def unclipped(batch: pa.RecordBatch, device_id: str, columns: Columns) -> pa.RecordBatch:
        rows = real(batch, device_id, columns)
        apparent = pc.multiply(batch.column("voltage"), batch.column("current"))
        ratio = pc.divide(batch.column("power"), apparent)
        clipped = rows.column("power_factor")
        unclipped = pc.if_else(pc.is_null(clipped), clipped, ratio)
        return rows.set_column(11, SCHEMA.field(11), unclipped)

    monkeypatch.setattr(export_pipeline.engine.slice_files, "to_export", unclipped)
    stack.write(awkward_day(SATURDAY))
    settings = stack.settings()
    export_day(stack, settings, SATURDAY)
    with pytest.raises(AssertionError, match="2 missing from S3"):
        assert_reconciled(stack, "D1", [SATURDAY], settings=settings)


# --- The audit catches every kind of damage in S3 ---------------------------------------------


class Exported:
    """A real export of an awkward day, and the means to damage its folder."""

    def __init__(self, stack: Stack, fmt: str, tmp_path: Path) -> None:
        self.stack, self.fmt, self.tmp_path = stack, fmt, tmp_path
        self.settings = stack.settings(EXPORT_FORMAT=fmt)
        stack.write(awkward_day(SATURDAY))
        export_day(stack, self.settings, SATURDAY)
        self.folder = device_day_folder("telemetry", "D1", SATURDAY, "seed")
        assert self.audit() == POINTS_PER_DAY

    def audit(self) -> int:
        return assert_reconciled(self.stack, "D1", [SATURDAY], settings=self.settings)

    def objects(self) -> dict[str, SliceObject]:
        found = read_slice_objects(self.stack.s3, self.stack.bucket, self.folder, self.fmt)
        return {item.key[len(self.folder) :]: item for item in found}

    def rewrite(self, name: str, rows: list[Row]) -> None:
        """Write `rows` as the exporter writes a slice file, under `name` in the folder."""
        columns = [[row[i] for row in rows] for i in range(len(COLUMNS))]
        arrays = [
            pa.array(values, kind) for values, (_, kind) in zip(columns, COLUMNS, strict=True)
        ]
        table = pa.Table.from_arrays(arrays, names=SCHEMA.names).cast(SCHEMA)
        path = self.tmp_path / f"rewritten.{self.fmt}"
        slice_file = ExportFile(path, self.fmt, rows_per_group=1_000)
        for batch in table.to_batches():
            slice_file.write(batch)
        slice_file.close()
        key = self.folder + name
        self.stack.s3.put_object(Bucket=self.stack.bucket, Key=key, Body=path.read_bytes())


@pytest.fixture(params=["parquet", "csv"])
def exported(request: pytest.FixtureRequest, stack: Stack, tmp_path: Path) -> Exported:
    return Exported(stack, request.param, tmp_path)


def test_a_row_missing_from_s3_fails_the_audit(exported: Exported) -> None:
    noon = exported.objects()[f"export_120000.{exported.fmt}"]
    assert len(noon.rows) == 2
    exported.rewrite(f"export_120000.{exported.fmt}", noon.rows[:1])
    with pytest.raises(AssertionError, match="S3 holds 9 rows, InfluxDB 10; 1 missing from S3"):
        exported.audit()


def test_a_row_duplicated_in_its_own_slice_file_fails_the_audit(exported: Exported) -> None:
    noon = exported.objects()[f"export_120000.{exported.fmt}"]
    exported.rewrite(f"export_120000.{exported.fmt}", [noon.rows[0], *noon.rows])
    with pytest.raises(AssertionError, match="S3 holds 11 rows, InfluxDB 10; 0 missing from S3"):
        exported.audit()


def test_a_row_duplicated_in_another_slice_file_fails_the_audit(exported: Exported) -> None:
    objects = exported.objects()
    noon, later = objects[f"export_120000.{exported.fmt}"], objects[f"export_120500.{exported.fmt}"]
    exported.rewrite(f"export_120500.{exported.fmt}", [noon.rows[-1], *later.rows])
    # A row belongs to one slice only, so its copy in another file is out of place.
    with pytest.raises(AssertionError, match=r"export_120500.* holds rows outside its 300 s"):
        exported.audit()


def test_a_value_changed_by_the_last_bit_fails_the_audit(exported: Exported) -> None:
    noon = exported.objects()[f"export_120000.{exported.fmt}"]
    first = list(noon.rows[0])
    first[4] = math.nextafter(first[4], math.inf)  # voltage, one ulp higher
    exported.rewrite(f"export_120000.{exported.fmt}", [tuple(first), *noon.rows[1:]])
    with pytest.raises(AssertionError, match=r"1 missing from S3 .* 1 not in InfluxDB"):
        exported.audit()


def test_a_row_moved_into_the_wrong_slice_file_fails_the_audit(exported: Exported) -> None:
    objects = exported.objects()
    noon, later = objects[f"export_120000.{exported.fmt}"], objects[f"export_120500.{exported.fmt}"]
    exported.rewrite(f"export_120000.{exported.fmt}", noon.rows[:-1])
    exported.rewrite(f"export_120500.{exported.fmt}", [noon.rows[-1], *later.rows])
    # Every row is still there exactly once: only its place is wrong.
    with pytest.raises(AssertionError, match=r"export_120500.* holds rows outside its 300 s slice"):
        exported.audit()


def test_without_the_slice_length_a_row_in_the_wrong_file_still_fails(
    stack: Stack, tmp_path: Path
) -> None:
    """Audited with the stack's own settings only (as the older callers do), the slice length
    is taken from the object names: 300 s here, from 12:00:00's file and 12:05:00's."""
    exported = Exported(stack, "parquet", tmp_path)
    objects = exported.objects()
    noon, later = objects["export_120000.parquet"], objects["export_120500.parquet"]
    exported.rewrite("export_120000.parquet", noon.rows[:-1])
    exported.rewrite("export_120500.parquet", [noon.rows[-1], *later.rows])
    with pytest.raises(AssertionError, match=r"export_120500.* holds rows outside its 300 s slice"):
        assert_reconciled(stack, "D1", [SATURDAY])


def test_rows_out_of_order_in_a_slice_file_fail_the_audit(exported: Exported) -> None:
    name = f"export_120500.{exported.fmt}"
    later = exported.objects()[name]
    exported.rewrite(name, list(reversed(later.rows)))
    with pytest.raises(AssertionError, match="rows are not sorted by timestamp"):
        exported.audit()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "not a slice file"),
        ("export_120000.{other}", "not a slice file"),  # a stale file of the other format
        ("export_250000.{fmt}", "names no time of day"),
        ("export_120100.{fmt}", "not named for a 300 s slice start"),
        ("sub/export_120000.{fmt}", "not a slice file"),
        ("export_180000.{fmt}", "holds no rows"),
    ],
)
def test_a_foreign_object_in_the_folder_fails_the_audit(
    exported: Exported, name: str, reason: str
) -> None:
    other = "csv" if exported.fmt == "parquet" else "parquet"
    name = name.format(fmt=exported.fmt, other=other)
    noon = exported.objects()[f"export_120000.{exported.fmt}"]
    # A well-formed file of the right format, with the rows of a real slice or (at 18:00) none.
    exported.rewrite(name, [] if name.startswith("export_18") else noon.rows)
    with pytest.raises(AssertionError, match=reason):
        exported.audit()


# --- The closed-day dataset: one Parquet object per device-day --------------------------------

DAILY = "daily"
DAY_SCHEMA = pa.schema(COLUMNS)  # the documented 12 columns; nothing of the package's


def day_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DAY_SCHEMA)


def saturday_rows() -> list[dict[str, Any]]:
    """Three points of Saturday, as the documented Schema table turns them into columns."""
    common = {"device_id": "D1", "day_of_week": 5, "is_weekend": True}
    return [
        {
            "timestamp": datetime(2026, 2, 7, 0, tzinfo=UTC),
            "device_type": "bulb",
            "location": "lab",
            "voltage": 230.0,
            "current": 0.5,
            "power": 100.0,
            "temperature": 21.5,
            "hour": 0,
            "power_factor": 100 / 115,
            **common,
        },
        {
            "timestamp": datetime(2026, 2, 7, 12, 4, 59, 999_999, tzinfo=UTC),
            "device_type": "bulb",
            "location": "lab",
            "voltage": 231.25,
            "current": 2.0,
            "power": 1000.0,
            "temperature": None,
            "hour": 12,
            "power_factor": 1.0,
            **common,
        },
        {
            "timestamp": datetime(2026, 2, 7, 23, 59, 59, tzinfo=UTC),
            "device_type": "bulb",
            "location": None,
            "voltage": None,
            "current": None,
            "power": None,
            "temperature": -4.5,
            "hour": 23,
            "power_factor": None,
            **common,
        },
    ]


class DailyFolder:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        stack.write(
            [
                point(at(SATURDAY, 0), "D1", {"voltage": 230, "current": 0.5, "power": 100}),
                point(at(SATURDAY, 0), "D1", {"temperature": 21.5}),  # the same point, merged
                point(
                    at(SATURDAY, 12, 4, 59, 999_999_999), "D1", {"voltage": 231.25, "power": 1e3}
                ),
                point(at(SATURDAY, 12, 4, 59, 999_999_999), "D1", {"current": 2}),
                point(at(SATURDAY, 23, 59, 59), "D1", {"temperature": -4.5}, location=""),
                point(at(MONDAY, 1), "D2", {"voltage": 1.0}),  # another device
            ]
        )

    def put(self, day: date, name: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        key = device_day_folder(DAILY, "D1", day, "hive") + name
        self.stack.s3.put_object(Bucket=self.stack.bucket, Key=key, Body=buffer.getvalue())

    def audit(self, *days: date) -> int:
        return assert_day_file_reconciled(self.stack, "D1", days, daily_prefix=DAILY)


@pytest.fixture
def daily(stack: Stack) -> DailyFolder:
    return DailyFolder(stack)


def test_one_parquet_object_per_day_with_rows_reconciles(daily: DailyFolder) -> None:
    daily.put(SATURDAY, "part-0.parquet", day_table(saturday_rows()))
    assert daily.audit(SATURDAY, date(2026, 2, 8), MONDAY) == 3


def test_a_day_file_with_a_row_missing_or_a_value_changed_fails(daily: DailyFolder) -> None:
    daily.put(SATURDAY, "part-0.parquet", day_table(saturday_rows()[:2]))
    with pytest.raises(AssertionError, match="1 missing from S3"):
        daily.audit(SATURDAY)
    changed = saturday_rows()
    changed[1]["power_factor"] = 1000 / (231.25 * 2)  # not clipped
    daily.put(SATURDAY, "part-0.parquet", day_table(changed))
    with pytest.raises(AssertionError, match=r"1 missing from S3 .* 1 not in InfluxDB"):
        daily.audit(SATURDAY)


def test_a_day_file_out_of_timestamp_order_fails(daily: DailyFolder) -> None:
    daily.put(SATURDAY, "part-0.parquet", day_table(saturday_rows()[::-1]))
    with pytest.raises(AssertionError, match="not sorted by timestamp"):
        daily.audit(SATURDAY)


def test_a_day_split_over_two_objects_fails(daily: DailyFolder) -> None:
    rows = saturday_rows()
    daily.put(SATURDAY, "part-0.parquet", day_table(rows[:2]))
    daily.put(SATURDAY, "part-1.parquet", day_table(rows[2:]))
    with pytest.raises(AssertionError, match="2 objects in daily/device_id=D1/date=2026-02-07/"):
        daily.audit(SATURDAY)


def test_a_day_with_rows_and_no_object_fails(daily: DailyFolder) -> None:
    with pytest.raises(AssertionError, match="0 objects"):
        daily.audit(SATURDAY)


def test_an_object_for_a_day_without_rows_fails(daily: DailyFolder) -> None:
    daily.put(date(2026, 2, 8), "part-0.parquet", day_table([]))
    with pytest.raises(AssertionError, match="InfluxDB has no rows, but S3 holds"):
        daily.audit(date(2026, 2, 8))


def test_a_day_file_that_is_not_parquet_or_has_other_columns_fails(daily: DailyFolder) -> None:
    daily.put(SATURDAY, "part-0.csv", day_table(saturday_rows()))
    with pytest.raises(AssertionError, match=r"not a .parquet file"):
        daily.audit(SATURDAY)
    daily.stack.s3.delete_object(
        Bucket=daily.stack.bucket,
        Key=device_day_folder(DAILY, "D1", SATURDAY, "hive") + "part-0.csv",
    )
    daily.put(SATURDAY, "part-0.parquet", day_table(saturday_rows()).drop_columns(["hour"]))
    with pytest.raises(AssertionError, match="has columns"):
        daily.audit(SATURDAY)


def test_an_answer_in_several_chunks_is_read_whole(stack: Stack) -> None:
    # InfluxDB answers a chunked query in documents of 10,000 points.
    start = at(SATURDAY, 5)
    stack.write(point(start + i * NS, "D1", {"power": float(i)}) for i in range(25_000))
    settings = stack.settings(EXPORT_INTERVAL_SECONDS="3600")
    export_day(stack, settings, SATURDAY)
    assert assert_reconciled(stack, "D1", [SATURDAY], settings=settings) == 25_000
