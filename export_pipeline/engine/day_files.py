"""The daily dataset (`telemetry_daily`): one Parquet object per closed device-day (its
partitions are dates, each the fleet's day files of that date).

It reads InfluxDB itself, one streamed query per device-day, never the slices, so a year of history
can be exported without writing a slice first. The day is written to local disk row group by row
group (memory is bounded by DAY_FILE_ROWS_PER_GROUP whatever the day's size), then published in one
upload under its fixed key: a rerun replaces the object whole, and a write killed half-way leaves
the previous object or none. A day without rows has no object.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from export_pipeline.engine.dataset import (
    EmptyReadRefused,
    ExportReport,
    Stopped,
    prefetched,
    timed,
)
from export_pipeline.engine.files import DAY_FILE_PARQUET, DAY_FILE_ROWS_PER_GROUP, ExportFile
from export_pipeline.engine.grid import SECONDS_PER_DAY, DayRange, day_bounds_ns
from export_pipeline.engine.influx import CountingSource
from export_pipeline.engine.layout import day_file_key, validate_device_id
from export_pipeline.engine.progress import DayTotals
from export_pipeline.engine.reconciliation import (
    Reconciliation,
    footer_bytes,
    parquet_field_counts,
    parquet_footer,
)
from export_pipeline.engine.schema import to_export
from export_pipeline.engine.store import ObjectStore


@dataclass(frozen=True)
class StagedDay:
    """A device-day written to local disk, not yet in S3; `path` is None for a day without rows."""

    device_id: str
    day: date
    key: str
    path: Path | None
    report: ExportReport


def stage_day(
    source: CountingSource,
    *,
    device_id: str,
    day: date,
    key: str,
    folder_uri: str,
    directory: Path,
    batch_rows: int,
    stop: threading.Event | None = None,
) -> StagedDay:
    """Read the device-day from InfluxDB into a Parquet file in `directory`, by time."""
    validate_device_id(device_id)
    columns = source.columns
    report = ExportReport(device_id, day, folder_uri, fields=columns.field_names)
    handle, name = tempfile.mkstemp(dir=directory, suffix=".parquet")
    os.close(handle)
    path = Path(name)
    start_ns, end_ns = day_bounds_ns(day)
    reading = prefetched(
        source.read(device_id, start_ns=start_ns, end_ns=end_ns, batch_rows=batch_rows)
    )
    started = time.perf_counter()
    day_file = ExportFile(
        path,
        "parquet",
        columns=columns,
        rows_per_group=DAY_FILE_ROWS_PER_GROUP,
        parquet=DAY_FILE_PARQUET,
    )
    last = start_ns
    try:
        for raw in timed(reading, report):
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped while writing {key}")
            times = raw.column("time")
            if len(times) and (
                times[0].as_py() < last or pc.any(pc.less(times[1:], times[:-1])).as_py()
            ):
                raise ValueError("InfluxDB returned points out of time order")
            last = times[-1].as_py() if len(times) else last
            rows = to_export(raw, device_id, columns)
            day_file.write(rows)
            report.add(rows)
        report.bytes_written = day_file.close()
    except BaseException:
        day_file.abandon()
        raise
    finally:
        reading.close()
    report.write_seconds = time.perf_counter() - started - report.read_seconds
    if report.rows == 0:
        path.unlink(missing_ok=True)
        return StagedDay(device_id, day, key, None, report)
    return StagedDay(device_id, day, key, path, report)


def publish(store: ObjectStore, staged: StagedDay) -> None:
    """Put a staged device-day under its key, whole; a day without rows puts nothing, and is
    refused where an object exists (an empty answer from InfluxDB is no proof of no data)."""
    if staged.path is None:
        if staged.key in store.list_keys(staged.key.rsplit("/", 1)[0] + "/"):
            raise EmptyReadRefused(
                f"InfluxDB returned no rows for {staged.device_id} on {staged.day}, but "
                f"{store.uri(staged.key)} exists; it was kept. If the points were removed from "
                "InfluxDB on purpose, delete the object by hand."
            )
        return
    try:
        store.upload(staged.path, key=staged.key, fmt="parquet")
    finally:
        staged.path.unlink(missing_ok=True)
    staged.report.files_written = [store.uri(staged.key)]


def reconcile_day_file(
    source: CountingSource, *, device_id: str, day: date, key: str, footer: pq.FileMetaData | None
) -> Reconciliation:
    """InfluxDB's count of values per field for the device-day (one aggregate query, not a read)
    against the day file's, taken from its Parquet statistics; `footer` None: there is no file."""
    start_ns, end_ns = day_bounds_ns(day)
    counts = source.field_counts(start_ns=start_ns, end_ns=end_ns, device_id=device_id)
    columns = source.columns
    result = Reconciliation(
        device_id,
        day,
        SECONDS_PER_DAY,
        field_counts=counts.get(device_id, dict.fromkeys(columns.field_names, 0)),
        exported_field_counts=dict.fromkeys(columns.field_names, 0),
    )
    if footer is None:
        return result
    result.files, result.exported_rows = 1, footer.num_rows
    file_counts = parquet_field_counts(footer, columns.field_names)
    result.exported_field_counts = file_counts or {}
    # A file of other columns (written before a field appeared, or EXPORT_FIELDS changed) is
    # written again with today's.
    schema = footer.schema.to_arrow_schema().remove_metadata()
    if file_counts is None or not schema.equals(columns.schema):
        result.schema_mismatches.append(key)
    return result


@dataclass(frozen=True)
class DayFiles:
    """`telemetry_daily` as a `Dataset`: each day file is published as soon as it is written,
    then reconciled from its footer in S3 (one ranged GET)."""

    source: CountingSource
    store: ObjectStore
    prefix: str
    batch_rows: int
    staging: Path
    # What the reconciliations found, by key: the object's size and footer, serialized (None:
    # no object). The Iceberg table's commit of the run's dates takes them from here, not from
    # S3 again.
    seen: dict[str, tuple[int, bytes] | None] = field(default_factory=dict)

    def key(self, device_id: str, day: date) -> str:
        return day_file_key(self.prefix, device_id=device_id, day=day)

    def stage(self, device_id: str, piece: DayRange, stop: threading.Event | None) -> StagedDay:
        if piece != DayRange.whole(piece.day):
            raise ValueError(f"a day file holds a whole day, not [{piece.start}, {piece.end}) s")
        key = self.key(device_id, piece.day)
        return stage_day(
            self.source,
            device_id=device_id,
            day=piece.day,
            key=key,
            folder_uri=self.store.uri(key.rsplit("/", 1)[0] + "/"),
            directory=self.staging,
            batch_rows=self.batch_rows,
            stop=stop,
        )

    def export(
        self,
        device_id: str,
        piece: DayRange,
        stop: threading.Event | None = None,
        *,
        fresh: bool = False,
    ) -> ExportReport:
        staged = self.stage(device_id, piece, stop)
        publish(self.store, staged)
        return staged.report

    def footer(self, key: str) -> pq.FileMetaData | None:
        sizes = self.store.list_keys(key.rsplit("/", 1)[0] + "/")
        if key not in sizes:
            self.seen[key] = None
            return None
        footer = parquet_footer(self.store, key)
        self.seen[key] = (sizes[key], footer_bytes(footer))
        return footer

    def reconcile(self, device_id: str, day: date, totals: DayTotals | None) -> Reconciliation:
        """From the file itself, whatever its export reported (`totals`)."""
        key = self.key(device_id, day)
        return reconcile_day_file(
            self.source, device_id=device_id, day=day, key=key, footer=self.footer(key)
        )
