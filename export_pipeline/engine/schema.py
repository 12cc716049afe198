"""The exported schema and the rules that derive its computed columns.

What is exported is chosen by the settings (EXPORT_FIELDS, EXPORT_TAGS) and typed by InfluxDB
(`SHOW FIELD KEYS`): `Columns` is that choice, made once per run by `plan_columns`, and everything
that reads or writes rows takes its schemas from it. The seed's columns come first, in the seed's
order, where their inputs are exported; the other fields and tags follow, sorted by name.

Derived columns come from the UTC timestamp so that a row means the same thing wherever it is read:
`hour` 0-23, `day_of_week` 0 = Monday ... 6 = Sunday, `is_weekend` Saturday or Sunday, and
`power_factor` = power / (voltage x current) clipped to [0, 1], null where it cannot be computed
(a missing input, a zero or negative apparent power, or a non-finite result); it is exported only
with its three inputs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc

from export_pipeline.settings import (
    FIELD_TYPES,
    SEED_FIELDS,
    SEED_TAGS,
    InfluxSettings,
    listed,
    name_problems,
)

POWER_FACTOR_INPUTS = ("power", "voltage", "current")

# InfluxDB's field types, as Arrow reads them.
ARROW_TYPES: dict[str, pa.DataType] = {
    "float": pa.float64(),
    "integer": pa.int64(),
    "unsigned": pa.uint64(),
    "boolean": pa.bool_(),
    "string": pa.string(),
}
assert set(ARROW_TYPES) == set(FIELD_TYPES)
NUMERIC = frozenset({"float", "integer", "unsigned"})


class ColumnsError(ValueError):
    """The fields and tags to export cannot be read as asked; the message names each culprit."""


@dataclass(frozen=True)
class Columns:
    """What an export reads and writes: tags (strings) and typed fields, each a column named as
    in InfluxDB. `casts` are the fields read with an InfluxQL cast (a declared widening)."""

    tags: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]  # (name, InfluxDB type)
    casts: frozenset[str] = frozenset()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @cached_property
    def source_schema(self) -> pa.Schema:
        """What the reader hands over: InfluxDB's epoch-nanosecond time, the tags, the fields."""
        return pa.schema(
            [pa.field("time", pa.int64())]
            + [pa.field(name, pa.string()) for name in self.tags]
            + [pa.field(name, ARROW_TYPES[kind]) for name, kind in self.fields]
        )

    @cached_property
    def power_factor(self) -> bool:
        kinds = dict(self.fields)
        return all(kinds.get(name) in NUMERIC for name in POWER_FACTOR_INPUTS)

    @cached_property
    def schema(self) -> pa.Schema:
        """The exported rows: the seed's columns first, in the seed's order, where their inputs
        are exported; then the other fields and tags, sorted by name."""
        kinds = dict(self.fields)
        seed = [pa.field(name, pa.string()) for name in SEED_TAGS if name in self.tags]
        seed += [pa.field(name, ARROW_TYPES[kinds[name]]) for name in SEED_FIELDS if name in kinds]
        derived = [
            pa.field("hour", pa.int8(), nullable=False),
            pa.field("day_of_week", pa.int8(), nullable=False),
            pa.field("is_weekend", pa.bool_(), nullable=False),
        ]
        if self.power_factor:
            derived.append(pa.field("power_factor", pa.float64()))
        others = {name: pa.string() for name in self.tags if name not in SEED_TAGS}
        others |= {n: ARROW_TYPES[k] for n, k in self.fields if n not in SEED_FIELDS}
        return pa.schema(
            [
                pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
                pa.field("device_id", pa.string(), nullable=False),
                *seed,
                *derived,
                *(pa.field(name, others[name]) for name in sorted(others)),
            ]
        )

    @property
    def dictionary_columns(self) -> list[str]:
        """The columns of few distinct values in a slice: the device and its tags."""
        return ["device_id", *self.tags]

    def to_export(self, batch: pa.RecordBatch, device_id: str) -> pa.RecordBatch:
        """Turn one batch read from InfluxDB (`source_schema`) into rows of `schema`."""
        # Nanoseconds are truncated to the microseconds Parquet readers everywhere understand.
        timestamp = pc.cast(
            pc.cast(batch.column("time"), pa.timestamp("ns", tz="UTC")),
            pa.timestamp("us", tz="UTC"),
            safe=False,
        )
        day_of_week = pc.day_of_week(timestamp)
        made: dict[str, pa.Array] = {
            "timestamp": timestamp,
            "device_id": pa.repeat(constant(device_id, pa.string()), batch.num_rows),
            "hour": pc.cast(pc.hour(timestamp), pa.int8()),
            "day_of_week": pc.cast(day_of_week, pa.int8()),
            "is_weekend": pc.greater_equal(day_of_week, _SATURDAY),
        }
        if self.power_factor:
            power, voltage, current = (
                pc.cast(batch.column(name), pa.float64()) for name in POWER_FACTOR_INPUTS
            )
            made["power_factor"] = power_factor(power, voltage, current)
        columns = [made[name] if name in made else batch.column(name) for name in self.schema.names]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


# The seed's columns, as the default settings export them.
SEED_COLUMNS = Columns(tags=SEED_TAGS, fields=tuple((name, "float") for name in SEED_FIELDS))
SCHEMA = SEED_COLUMNS.schema
SOURCE_SCHEMA = SEED_COLUMNS.source_schema


def to_export(
    batch: pa.RecordBatch, device_id: str, columns: Columns = SEED_COLUMNS
) -> pa.RecordBatch:
    """Turn one batch read from InfluxDB (`columns.source_schema`) into rows of
    `columns.schema`: the one transform both datasets apply."""
    return columns.to_export(batch, device_id)


def plan_columns(
    influx: InfluxSettings,
    *,
    field_keys: Iterable[tuple[str, str]],
    tag_keys: Sequence[str],
) -> Columns:
    """The columns to export: the settings' fields and tags (`*`: every one InfluxDB lists), each
    field typed as InfluxDB lists it (`field_keys`: (name, type) pairs, a field with values of two
    types in different shards listed twice). A listed field InfluxDB does not know yet is left
    out until it does (or read as its declared type); the seed's four fields are always floats,
    known or not. Raises ColumnsError naming every field of
    two types not declared in EXPORT_FIELD_TYPES, and every name no column may take
    (`settings.name_problems`)."""
    found: dict[str, set[str]] = {}
    for name, listed_type in field_keys:
        found.setdefault(name, set()).add(listed_type)
    declared = dict(pair.rpartition(":")[::2] for pair in listed(influx.field_types) or ())
    wanted_fields = listed(influx.fields)
    names = sorted(found) if wanted_fields is None else list(wanted_fields)
    wanted_tags = listed(influx.tags)
    tags = sorted(set(tag_keys) - {"device_id"}) if wanted_tags is None else list(wanted_tags)
    problems = name_problems(fields=names, tags=tags)
    fields, casts = [], set()
    for name in names:
        kind = declared.get(name)
        if name not in found and name not in SEED_FIELDS:
            # Not written yet: typed when InfluxDB first lists it (from the next run), unless a
            # type is declared; guessing would give a column of two types across files.
            if kind is not None:
                fields.append((name, kind))
            continue
        kinds = found.get(name, {"float"})
        if kind is None and name in SEED_FIELDS:
            # The seed's four stay floats, as the seed's schema has them: integers are cast, and
            # a string value fails the read of its device-day, naming the value.
            fields.append((name, "float"))
            if kinds != {"float"} and kinds <= NUMERIC:
                casts.add(name)
            continue
        if kind is None and len(kinds) > 1:
            problems.append(
                f"field {name!r} is {' in some shards and '.join(sorted(kinds))} in others of "
                f"INFLUXDB_MEASUREMENT={influx.measurement!r}: declare the type to read it as in "
                f"EXPORT_FIELD_TYPES (e.g. {name}:float)"
            )
            continue
        if kind is not None and not (kinds == {kind} or (kind == "float" and kinds <= NUMERIC)):
            problems.append(
                f"EXPORT_FIELD_TYPES reads {name!r} as {kind}, but InfluxDB has it as "
                f"{' and '.join(sorted(kinds))}: only integers and unsigned integers widen "
                "(to float)"
            )
            continue
        if kind is not None and kinds != {kind}:
            casts.add(name)
        fields.append((name, kind or next(iter(kinds))))
    if problems:
        raise ColumnsError("; ".join(problems))
    return Columns(tags=tuple(tags), fields=tuple(fields), casts=frozenset(casts))


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
