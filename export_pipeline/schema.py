"""The exported schema, declared once, and the rules that derive its computed columns.

Derived columns come from the UTC timestamp so that a row means the same thing wherever it is read:
`hour` 0-23, `day_of_week` 0 = Monday ... 6 = Sunday, `is_weekend` Saturday or Sunday, and
`power_factor` = power / (voltage x current) clipped to [0, 1], null where it cannot be computed
(a missing input, a zero or negative apparent power, or a non-finite result).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

TAG_COLUMNS = ("device_type", "location")
FIELD_COLUMNS = ("voltage", "current", "power", "temperature")
DICTIONARY_COLUMNS = ("device_id", "device_type", "location")

SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("device_type", pa.string()),
        pa.field("location", pa.string()),
        pa.field("voltage", pa.float64()),
        pa.field("current", pa.float64()),
        pa.field("power", pa.float64()),
        pa.field("temperature", pa.float64()),
        pa.field("hour", pa.int8(), nullable=False),
        pa.field("day_of_week", pa.int8(), nullable=False),
        pa.field("is_weekend", pa.bool_(), nullable=False),
        pa.field("power_factor", pa.float64()),
    ]
)

# What the reader hands over: InfluxDB's epoch-nanosecond time plus the tags and fields.
SOURCE_SCHEMA = pa.schema(
    [pa.field("time", pa.int64())]
    + [pa.field(name, pa.string()) for name in TAG_COLUMNS]
    + [pa.field(name, pa.float64()) for name in FIELD_COLUMNS]
)


_NULL = pa.scalar(None, pa.float64())


def power_factor(power: pa.Array, voltage: pa.Array, current: pa.Array) -> pa.Array:
    apparent = pc.multiply(voltage, current)
    ratio = pc.divide(power, pc.if_else(pc.greater(apparent, 0.0), apparent, _NULL))
    finite = pc.if_else(pc.is_finite(ratio), ratio, _NULL)
    clipped = pc.max_element_wise(finite, 0.0, skip_nulls=False)
    return pc.min_element_wise(clipped, 1.0, skip_nulls=False)


def to_export(batch: pa.RecordBatch, device_id: str) -> pa.RecordBatch:
    """Turn one batch read from InfluxDB (SOURCE_SCHEMA) into rows of SCHEMA."""
    # Nanoseconds are truncated to the microseconds Parquet readers everywhere understand.
    timestamp = pc.cast(
        pc.cast(batch.column("time"), pa.timestamp("ns", tz="UTC")),
        pa.timestamp("us", tz="UTC"),
        safe=False,
    )
    day_of_week = pc.day_of_week(timestamp)
    columns = [
        timestamp,
        pa.repeat(pa.scalar(device_id, pa.string()), batch.num_rows),
        batch.column("device_type"),
        batch.column("location"),
        *(batch.column(name) for name in FIELD_COLUMNS),
        pc.cast(pc.hour(timestamp), pa.int8()),
        pc.cast(day_of_week, pa.int8()),
        pc.greater_equal(day_of_week, 5),
        power_factor(batch.column("power"), batch.column("voltage"), batch.column("current")),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)
