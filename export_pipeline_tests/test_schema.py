import math
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from export_pipeline.schema import SCHEMA, SOURCE_SCHEMA, power_factor, to_export


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
