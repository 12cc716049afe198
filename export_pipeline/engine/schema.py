"""The exported schema, declared once, and the rules that derive its computed columns.

Derived columns come from the UTC timestamp so that a row means the same thing wherever it is read:
`hour` 0-23, `day_of_week` 0 = Monday ... 6 = Sunday, `is_weekend` Saturday or Sunday, and
`power_factor` = power / (voltage x current) clipped to [0, 1], null where it cannot be computed
(a missing input, a zero or negative apparent power, or a non-finite result).
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

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


_PACKED = {pa.int64(): "<q", pa.float64(): "<d"}


def constant(value: int | float | str | None, type_: pa.DataType) -> pa.Scalar:
    """An Arrow scalar built from its bytes, not converted from a Python object: pyarrow's
    first conversion of any Python object imports pandas, 0.4 s at the start of every run,
    and nothing here uses pandas."""
    if value is None:
        return pa.nulls(1, type_)[0]
    if isinstance(value, str):
        data = value.encode()
        offsets = pa.py_buffer(struct.pack("<ii", 0, len(data)))
        return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])[0]
    packed = pa.py_buffer(struct.pack(_PACKED[type_], value))
    return pa.Array.from_buffers(type_, 1, [None, packed])[0]


def timestamp_of(value: pa.Scalar) -> datetime:
    """A value of the `timestamp` column (microseconds) as a datetime in UTC, without
    `as_py()`, which imports pandas to read the time zone (see `constant`)."""
    return _EPOCH + timedelta(microseconds=value.value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NULL = constant(None, pa.float64())
_ZERO = constant(0.0, pa.float64())
_ONE = constant(1.0, pa.float64())
_SATURDAY = constant(5, pa.int64())


def power_factor(power: pa.Array, voltage: pa.Array, current: pa.Array) -> pa.Array:
    apparent = pc.multiply(voltage, current)
    ratio = pc.divide(power, pc.if_else(pc.greater(apparent, _ZERO), apparent, _NULL))
    finite = pc.if_else(pc.is_finite(ratio), ratio, _NULL)
    clipped = pc.max_element_wise(finite, _ZERO, skip_nulls=False)
    return pc.min_element_wise(clipped, _ONE, skip_nulls=False)


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
        pa.repeat(constant(device_id, pa.string()), batch.num_rows),
        batch.column("device_type"),
        batch.column("location"),
        *(batch.column(name) for name in FIELD_COLUMNS),
        pc.cast(pc.hour(timestamp), pa.int8()),
        pc.cast(day_of_week, pa.int8()),
        pc.greater_equal(day_of_week, _SATURDAY),
        power_factor(batch.column("power"), batch.column("voltage"), batch.column("current")),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)
