"""Does a device-day's export hold exactly InfluxDB's values? And has InfluxDB changed for a day
since it was reconciled (late data)?

InfluxDB's side is one aggregate query: its count of values per field for the device-day. The
export's side is what its writes counted (slices: rows, values and files, kept with the device's
progress, against one listing of the folder) or a day file's Parquet statistics (a ranged GET of
its footer). The counts are recorded with the evaluation: the late-data sweep compares them with
one aggregate query per day for the whole fleet, instead of reading every device-day again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq

from export_pipeline.engine.store import ObjectStore
from export_pipeline.settings import SEED_FIELDS

FOOTER_PROBE = 64 * 1024


@dataclass
class Reconciliation:
    """InfluxDB's side and S3's side of one device-day: values per field, which change with
    every point added, lost or written twice; and, where the exports counted them, the files."""

    device_id: str
    day: date
    through_offset: int  # seconds after midnight up to which the day was exported
    exported_rows: int = 0
    files: int = 0
    schema_mismatches: list[str] = field(default_factory=list)
    field_counts: dict[str, int] = field(default_factory=dict)
    exported_field_counts: dict[str, int] | None = None
    expected_files: int | None = None  # the objects the day's exports wrote, where counted
    unknown: bool = False  # what the day's exports wrote is not known: not reconcilable

    @property
    def passed(self) -> bool:
        exported = self.exported_field_counts
        counts = exported is None or same_counts(exported, self.field_counts)
        files = self.expected_files in (None, self.files)
        return counts and files and not self.schema_mismatches and not self.unknown

    @property
    def description(self) -> str:
        if self.passed:
            return f"{self.exported_rows} rows in {self.files} files match InfluxDB"
        if self.unknown:
            return "the day was exported in overlapping pieces, so what they hold is not known"
        parts = []
        exported = self.exported_field_counts
        if exported is not None and not same_counts(exported, self.field_counts):
            parts += [
                f"InfluxDB has {self.field_counts.get(name, 0)} {name} values, "
                f"S3 {exported.get(name, 0)}"
                for name in names_of(exported, self.field_counts)
                if exported.get(name, 0) != self.field_counts.get(name, 0)
            ]
        if self.expected_files is not None and self.expected_files != self.files:
            parts.append(f"S3 holds {self.files} files, the exports wrote {self.expected_files}")
        if self.schema_mismatches:
            parts.append(f"{len(self.schema_mismatches)} files with another schema")
        return "; ".join(parts)


def names_of(*counts: Mapping[str, int]) -> list[str]:
    """The fields of these counts in the columns' order: the seed's first, then by name."""
    names = {name for each in counts for name in each}
    seed = [name for name in SEED_FIELDS if name in names]
    return seed + sorted(names - set(seed))


def same_counts(one: Mapping[str, int], other: Mapping[str, int]) -> bool:
    """The same values per field, a field missing from one counting none there (exported before
    it appeared in InfluxDB, or no longer exported)."""
    return all(one.get(name, 0) == other.get(name, 0) for name in names_of(one, other))


def parquet_footer(store: ObjectStore, key: str) -> pq.FileMetaData:
    tail = store.read_tail(key, FOOTER_PROBE)
    footer_length = int.from_bytes(tail[-8:-4], "little")
    if footer_length + 8 > len(tail):
        tail = store.read_tail(key, footer_length + 8)
    return pq.read_metadata(pa.BufferReader(tail))


def footer_bytes(metadata: pq.FileMetaData) -> bytes:
    """A footer serialized (about 2.5 KB for a day file, where the parsed object takes about
    24 KB), to be kept for thousands of files and parsed again by `footer_of`."""
    out = pa.BufferOutputStream()
    metadata.write_metadata_file(out)
    return bytes(out.getvalue())


def footer_of(raw: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(raw))


def parquet_field_counts(metadata: pq.FileMetaData, fields: Sequence[str]) -> dict[str, int] | None:
    """Each of these fields' non-null values in a Parquet file, from its statistics (None when
    a row group has none); a field the file has no column for counts none."""
    columns = metadata.schema.to_arrow_schema().names
    counts = dict.fromkeys(fields, 0)
    present = [name for name in fields if name in columns]
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for name in present:
            statistics = row_group.column(columns.index(name)).statistics
            if statistics is None or not statistics.has_null_count:
                return None
            counts[name] += row_group.num_rows - statistics.null_count
    return counts


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
            for name in names_of(self.reconciled, self.now)
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
    changed = []
    for (device_id, day), then in sorted(reconciled.items()):
        now = counts_by_day.get(day, {}).get(device_id, {})
        # A field exported since the day was reconciled (EXPORT_FIELDS grew, or a field first
        # written later) counts as new points.
        if any(now.get(name, 0) > then.get(name, 0) for name in now):
            changed.append(LateData(device_id, day, dict(then), dict(now)))
    return changed
