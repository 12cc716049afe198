"""Does a device-day's folder hold exactly InfluxDB's rows, in the declared schema? And has
InfluxDB changed for a day since it was reconciled (late data)?

S3's side is read from Parquet footers (a ranged GET of the file's tail, not the file), or by
counting CSV rows; InfluxDB's side is the same query the export runs. A reconciliation also
records InfluxDB's count of values per field: the late-data sweep compares those with one
aggregate query per day for the whole fleet, instead of reading every device-day again.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from export_pipeline.influx import Source
from export_pipeline.schema import FIELD_COLUMNS, SCHEMA
from export_pipeline.slicing import SECONDS_PER_DAY, day_bounds_ns
from export_pipeline.writers import CSV_SCHEMA, ObjectStore

FOOTER_PROBE = 64 * 1024


@dataclass
class Reconciliation:
    """InfluxDB's side and S3's side of one device-day.

    Rows are compared where InfluxDB's rows were read (`source_rows`), values per field where
    the files' counts were taken (`exported_field_counts`, from Parquet statistics); either
    changes with every point added, lost or written twice.
    """

    device_id: str
    day: date
    through_offset: int  # seconds after midnight up to which the day was exported
    source_rows: int | None = 0
    exported_rows: int = 0
    files: int = 0
    schema_mismatches: list[str] = field(default_factory=list)
    field_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELD_COLUMNS, 0))
    exported_field_counts: dict[str, int] | None = None

    @property
    def passed(self) -> bool:
        rows = self.source_rows is None or self.source_rows == self.exported_rows
        counts = self.exported_field_counts in (None, self.field_counts)
        return rows and counts and not self.schema_mismatches

    @property
    def description(self) -> str:
        if self.passed:
            return f"{self.exported_rows} rows in {self.files} files match InfluxDB"
        parts = []
        if self.source_rows is not None and self.source_rows != self.exported_rows:
            parts.append(
                f"InfluxDB has {self.source_rows} rows, S3 {self.exported_rows} "
                f"({self.exported_rows - self.source_rows:+d})"
            )
        exported = self.exported_field_counts
        if exported is not None and exported != self.field_counts:
            parts += [
                f"InfluxDB has {self.field_counts[name]} {name} values, S3 {exported[name]}"
                for name in FIELD_COLUMNS
                if exported[name] != self.field_counts[name]
            ]
        if self.schema_mismatches:
            parts.append(f"{len(self.schema_mismatches)} files with another schema")
        return "; ".join(parts)


def parquet_footer(store: ObjectStore, key: str) -> pq.FileMetaData:
    tail = store.read_tail(key, FOOTER_PROBE)
    footer_length = int.from_bytes(tail[-8:-4], "little")
    if footer_length + 8 > len(tail):
        tail = store.read_tail(key, footer_length + 8)
    return pq.read_metadata(pa.BufferReader(tail))


def parquet_field_counts(metadata: pq.FileMetaData) -> dict[str, int] | None:
    """Each exported field's non-null values in a Parquet file, from its statistics (None when
    a row group has none)."""
    columns = metadata.schema.to_arrow_schema().names
    counts = dict.fromkeys(FIELD_COLUMNS, 0)
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for name in FIELD_COLUMNS:
            statistics = row_group.column(columns.index(name)).statistics
            if statistics is None or not statistics.has_null_count:
                return None
            counts[name] += row_group.num_rows - statistics.null_count
    return counts


def csv_rows_and_header(store: ObjectStore, key: str) -> tuple[int, list[str]]:
    body = store.read(key)
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(CSV_SCHEMA.names, pa.string()))
    table = pacsv.read_csv(io.BytesIO(body), convert_options=options)
    return table.num_rows, table.column_names


def reconcile(
    source: Source, store: ObjectStore, *, device_id: str, day: date, keys: Iterable[str]
) -> Reconciliation:
    """Compare the device's whole day in InfluxDB with the rows in the dataset's objects `keys`
    (the device-day's objects of one dataset, as it names them)."""
    source_rows = 0
    result = Reconciliation(device_id, day, SECONDS_PER_DAY)
    start_ns, end_ns = day_bounds_ns(day)
    for batch in source.read(device_id, start_ns=start_ns, end_ns=end_ns):
        source_rows += batch.num_rows
        for name in FIELD_COLUMNS:
            column = batch.column(name)
            result.field_counts[name] += len(column) - column.null_count
    for key in sorted(keys):
        result.files += 1
        if key.endswith(".parquet"):
            metadata = parquet_footer(store, key)
            result.exported_rows += metadata.num_rows
            if not metadata.schema.to_arrow_schema().remove_metadata().equals(SCHEMA):
                result.schema_mismatches.append(key)
        else:
            rows, header = csv_rows_and_header(store, key)
            result.exported_rows += rows
            if header != CSV_SCHEMA.names:
                result.schema_mismatches.append(key)
    result.source_rows = source_rows
    return result


@dataclass(frozen=True)
class LateData:
    """A reconciled device-day whose field counts in InfluxDB have changed since."""

    device_id: str
    day: date
    reconciled: dict[str, int]
    now: dict[str, int]

    @property
    def description(self) -> str:
        changes = [
            f"{name} {self.reconciled.get(name, 0)} -> {self.now.get(name, 0)}"
            for name in FIELD_COLUMNS
            if self.reconciled.get(name, 0) != self.now.get(name, 0)
        ]
        return f"InfluxDB changed after the day was reconciled: {', '.join(changes)}"


def late_data(
    reconciled: dict[tuple[str, date], dict[str, int]],
    counts_by_day: dict[date, dict[str, dict[str, int]]],
) -> list[LateData]:
    """The device-days where InfluxDB now counts more values of some field than it did when they
    were reconciled: points arrived since.

    `reconciled` holds whole-day counts per (device, day); `counts_by_day` what InfluxDB counts
    now, per day and device (a device absent from a day's answer has no values that day). Counts
    that only fell are not late data: a retention policy expired or points were deleted, and the
    objects in S3, perhaps the only copy left, are kept.
    """
    empty = dict.fromkeys(FIELD_COLUMNS, 0)
    changed = []
    for (device_id, day), then in sorted(reconciled.items()):
        now = counts_by_day.get(day, {}).get(device_id, empty)
        if any(now.get(name, 0) > then.get(name, 0) for name in FIELD_COLUMNS):
            changed.append(LateData(device_id, day, dict(then), dict(now)))
    return changed
