import math
import os
import subprocess
import sys
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from export_pipeline.engine.schema import (
    SCHEMA,
    SOURCE_SCHEMA,
    constant,
    power_factor,
    timestamp_of,
    to_export,
)


def source_batch(rows: list[dict[str, object]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=SOURCE_SCHEMA)


def test_the_export_schema_has_the_twelve_columns_in_order() -> None:
    assert SCHEMA.names == [
        "timestamp",
        "device_id",
        "device_type",
        "location",
        "voltage",
        "current",
        "power",
        "temperature",
        "hour",
        "day_of_week",
        "is_weekend",
        "power_factor",
    ]
    assert SCHEMA.field("timestamp").type == pa.timestamp("us", tz="UTC")


def test_derived_columns_come_from_the_utc_timestamp() -> None:
    saturday_late = int(datetime(2026, 2, 7, 23, 59, 59, tzinfo=UTC).timestamp()) * 10**9
    monday_early = int(datetime(2026, 2, 9, 0, 0, tzinfo=UTC).timestamp()) * 10**9
    rows = to_export(
        source_batch([{"time": saturday_late}, {"time": monday_early}]), "D1"
    ).to_pylist()
    assert [(r["hour"], r["day_of_week"], r["is_weekend"]) for r in rows] == [
        (23, 5, True),
        (0, 0, False),
    ]
    assert {r["device_id"] for r in rows} == {"D1"}


def test_nanoseconds_are_truncated_to_microseconds() -> None:
    batch = source_batch([{"time": 1_770_465_600_123_456_789}])
    stamp = to_export(batch, "D1").column("timestamp")[0].as_py()
    assert stamp == datetime(2026, 2, 7, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("power", "voltage", "current", "expected"),
    [
        (100.0, 230.0, 0.5, 100 / 115),
        (500.0, 230.0, 0.5, 1.0),  # clipped to 1
        (-5.0, 230.0, 0.5, 0.0),  # clipped to 0
        (5.0, 0.0, 1.0, None),  # no apparent power
        (5.0, -230.0, 1.0, None),  # negative apparent power
        (None, 230.0, 0.5, None),
        (5.0, None, 0.5, None),
        (math.nan, 230.0, 0.5, None),
        (math.inf, 230.0, 0.5, None),
    ],
)
def test_power_factor_is_clipped_and_null_where_it_cannot_be_computed(
    power: float | None, voltage: float | None, current: float | None, expected: float | None
) -> None:
    result = power_factor(
        pa.array([power], pa.float64()),
        pa.array([voltage], pa.float64()),
        pa.array([current], pa.float64()),
    )[0].as_py()
    assert result == pytest.approx(expected) if expected is not None else result is None


@pytest.mark.parametrize(
    ("value", "type_"),
    [
        (0, pa.int64()),
        (-(2**63), pa.int64()),
        (1_780_000_000_000_000_000, pa.int64()),
        (0.0, pa.float64()),
        (-1.5e300, pa.float64()),
        ("", pa.string()),
        ("sensor-é/\u00fc 1", pa.string()),
        (None, pa.float64()),
        (None, pa.string()),
    ],
)
def test_a_constant_is_the_scalar_pyarrow_would_convert(value: object, type_: pa.DataType) -> None:
    assert constant(value, type_) == pa.scalar(value, type_)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "micros", [0, 1, 1_770_465_600_123_456, -86_400_000_001, 253_402_300_799_999_999]
)
def test_timestamp_of_reads_a_timestamp_as_as_py_does(micros: int) -> None:
    value = pa.array([micros], pa.timestamp("us", tz="UTC"))[0]
    assert timestamp_of(value) == value.as_py()
    assert timestamp_of(value).tzinfo == UTC


def test_a_continuous_run_does_not_import_pandas() -> None:
    """pyarrow imports pandas at its first conversion of a Python object (0.4 s of every run's
    start); the export's code path (its modules and a device-slice cut, encoded and counted)
    must not need one."""
    code = """
import sys
from datetime import date
import pyarrow as pa
import export_pipeline.definitions
from export_pipeline.engine.dataset import ExportReport
from export_pipeline.engine.schema import SOURCE_SCHEMA, to_export
from export_pipeline.settings import FORMATS
from export_pipeline.engine.slice_files import split_by_slice
from export_pipeline.engine.files import ExportFile

day = date(2026, 2, 7)
start = 1_770_422_400 * 10**9
times = b"".join((start + second * 10**9).to_bytes(8, "little") for second in range(0, 180, 7))
count = len(times) // 8
batch = pa.RecordBatch.from_arrays(
    [pa.Array.from_buffers(pa.int64(), count, [None, pa.py_buffer(times)])]
    + [pa.nulls(count, field.type) for field in list(SOURCE_SCHEMA)[1:]],
    schema=SOURCE_SCHEMA,
)
rows = to_export(batch, "dev-1")
report = ExportReport("dev-1", day, "s3://exports/dev-1")
slices = list(split_by_slice(batch.column("time"), day, 60))
assert [offset for offset, _, _ in slices] == [0, 60, 120], slices
for _offset, first, size in slices:
    part = rows.slice(first, size)
    report.add(part)
    for fmt in FORMATS:
        exported = ExportFile(None, fmt, rows_per_group=1000)
        exported.write(part)
        exported.close()
assert report.rows == count and report.last_timestamp is not None, report
print("pandas" in sys.modules)
"""
    env = {**os.environ, "S3_BUCKET": "exports", "PYTHONPATH": os.getcwd()}
    answer = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "False"
