"""The slice dataset: one object per interval slice of a device-day, named by the slice's start.

Exporting a range makes its part of the folder equal to InfluxDB's content: every slice with rows
is written under its fixed key, and our objects of slices that no longer have rows are deleted.
Rerunning therefore rewrites the same keys and never duplicates a row. Stale objects are deleted
only after every upload succeeded, so a failed run loses nothing that was exported before.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from export_pipeline.engine.dataset import (
    EmptyReadRefused,
    ExportReport,
    Stopped,
    prefetched,
    timed,
)
from export_pipeline.engine.files import SMALL_SLICE_ROWS, ExportFile
from export_pipeline.engine.grid import (
    NS_PER_SECOND,
    SECONDS_PER_DAY,
    DayRange,
    Slice,
    check_interval,
    day_bounds_ns,
    slice_offsets,
)
from export_pipeline.engine.influx import CountingSource, Source
from export_pipeline.engine.layout import (
    device_folder,
    slice_key,
    slice_offset_of,
    validate_device_id,
)
from export_pipeline.engine.progress import DayTotals
from export_pipeline.engine.reconciliation import Reconciliation
from export_pipeline.engine.schema import to_export
from export_pipeline.engine.store import ObjectStore
from export_pipeline.settings import ExportSettings

UPLOAD_THREADS = 8
MAX_FILES_IN_FLIGHT = 16  # bounds the temporary disk an export holds while uploads catch up


def split_by_slice(
    times_ns: pa.Array, day: date, interval_seconds: int
) -> Iterator[tuple[int, int, int]]:
    """Cut time-sorted timestamps into runs of one slice: (slice offset, first row, row count)."""
    offsets = slice_offsets(times_ns, day, interval_seconds)
    # In Arrow, not numpy: `to_numpy()` imports pandas (see `schema.constant`).
    later, earlier = offsets.slice(1), offsets.slice(0, max(len(offsets) - 1, 0))
    if pc.any(pc.less(later, earlier)).as_py():
        raise ValueError("InfluxDB returned points out of time order; cannot slice them safely")
    changes = pc.indices_nonzero(pc.not_equal(later, earlier)).to_pylist()
    bounds = [0, *(index + 1 for index in changes), len(offsets)]
    for start, end in pairwise(bounds):
        if end > start:
            yield offsets[start].as_py(), start, end - start


def write_slices(
    source: Source,
    store: ObjectStore,
    *,
    prefix: str,
    device_id: str,
    piece: DayRange,
    settings: ExportSettings,
    stop: threading.Event | None = None,
    fresh: bool = False,
) -> ExportReport:
    """Export the slices of `piece` (whole slices of one UTC day) into the device-day's folder.

    Setting `stop` ends the export at the next slice boundary with `Stopped`: the objects already
    uploaded are complete, and nothing is deleted. A `fresh` range (beyond the device's
    checkpoint) skips listing the folder for objects to replace: at a slice a tick, that listing
    would be one request per device per tick.
    """
    validate_device_id(device_id)
    interval, day = settings.interval_seconds, piece.day
    check_interval(interval)
    if piece.start % interval or piece.end % interval or not 0 <= piece.start <= piece.end:
        raise ValueError(f"[{piece.start}, {piece.end}) is not a range of whole slices")
    folder = device_folder(prefix, device_id=device_id, day=day, layout=settings.layout)
    columns = source.columns
    report = ExportReport(device_id, day, store.uri(folder), fields=columns.field_names)
    if piece.start == piece.end:
        return report
    existing = {} if fresh else store.list_keys(folder)

    day_ns, _ = day_bounds_ns(day)
    start_ns = day_ns + piece.start * NS_PER_SECOND
    end_ns = day_ns + min(piece.end, SECONDS_PER_DAY) * NS_PER_SECOND
    written: set[str] = set()
    started = time.perf_counter()
    # A single slice (the usual tick) is written in memory and uploaded by the device's thread;
    # longer ranges go through local files, uploaded while the next slices are read.
    single = piece.end - piece.start == interval
    with ExitStack() as resources:
        workdir, pool = None, None
        if not single:
            workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="export-")))
            pool = resources.enter_context(
                ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload")
            )
        in_flight: deque[Future[None]] = deque()
        current: tuple[str, ExportFile] | None = None

        def finish() -> None:
            nonlocal current
            if current is None:
                return
            key, slice_file = current
            current = None
            report.bytes_written += slice_file.close()
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped before uploading {key}")
            if pool is None:
                store.put(slice_file.body(), key=key, fmt=slice_file.fmt)
            else:
                while len(in_flight) >= MAX_FILES_IN_FLIGHT:
                    in_flight.popleft().result()
                in_flight.append(pool.submit(_upload, store, slice_file, key))
            written.add(key)

        batches = source.read(
            device_id, start_ns=start_ns, end_ns=end_ns, batch_rows=settings.batch_size
        )
        reading = batches if single else prefetched(batches)
        try:
            for raw in timed(reading, report):
                rows = to_export(raw, device_id, columns)
                for offset, first, count in split_by_slice(raw.column("time"), day, interval):
                    key = slice_key(
                        prefix,
                        device_id=device_id,
                        piece=Slice(day, offset, interval),
                        layout=settings.layout,
                        fmt=settings.format,
                    )
                    if current is None or current[0] != key:
                        if key in written:
                            raise ValueError("InfluxDB returned points out of time order")
                        finish()
                        path = (
                            None if workdir is None else workdir / f"{offset:05d}.{settings.format}"
                        )
                        current = (
                            key,
                            ExportFile(
                                path,
                                settings.format,
                                columns=columns,
                                rows_per_group=settings.batch_size,
                                small_file_rows=SMALL_SLICE_ROWS,
                            ),
                        )
                    current[1].write(rows.slice(first, count))
                report.add(rows)
            finish()
        except BaseException:
            if current is not None:
                current[1].abandon()
            raise
        finally:
            close = getattr(reading, "close", None)
            if close is not None:
                close()  # stops and joins a reader thread, whatever happened
        for future in in_flight:
            future.result()
    # Everything that is not waiting on InfluxDB: converting, encoding and uploading.
    report.write_seconds = time.perf_counter() - started - report.read_seconds

    report.files_written = sorted(store.uri(key) for key in written)
    stale = _stale_keys(existing, folder, written, piece)
    if stale and not written:
        # InfluxDB's CSV answer turns some query errors (and a dropped database or an expired
        # retention period) into an empty body; emptying a folder on that word alone could
        # destroy the only remaining copy.
        raise EmptyReadRefused(
            f"InfluxDB returned no rows for {device_id} on {day} in [{piece.start}, "
            f"{piece.end}) s, but {report.folder_uri} holds {len(stale)} objects there; "
            "nothing was deleted. If the points were removed from InfluxDB on purpose, delete "
            "the objects by hand."
        )
    store.delete(stale)
    report.files_deleted = [store.uri(key) for key in stale]
    return report


def _upload(store: ObjectStore, slice_file: ExportFile, key: str) -> None:
    assert slice_file.path is not None
    try:
        store.upload(slice_file.path, key=key, fmt=slice_file.fmt)
    finally:
        slice_file.path.unlink(missing_ok=True)


def _stale_keys(
    existing: dict[str, int], folder: str, written: set[str], piece: DayRange
) -> list[str]:
    """Our objects in the exported range that this export did not write (either format)."""
    stale = []
    for key in existing:
        offset = slice_offset_of(key[len(folder) :])
        if offset is not None and piece.start <= offset < piece.end and key not in written:
            stale.append(key)
    return sorted(stale)


@dataclass(frozen=True)
class Slices:
    """`telemetry_export` as a `Dataset`: slice files under S3_PREFIX."""

    source: CountingSource
    store: ObjectStore
    prefix: str
    settings: ExportSettings

    def export(
        self,
        device_id: str,
        piece: DayRange,
        stop: threading.Event | None = None,
        *,
        fresh: bool = False,
    ) -> ExportReport:
        return write_slices(
            self.source,
            self.store,
            prefix=self.prefix,
            device_id=device_id,
            piece=piece,
            settings=self.settings,
            stop=stop,
            fresh=fresh,
        )

    def reconcile(self, device_id: str, day: date, totals: DayTotals | None) -> Reconciliation:
        """InfluxDB's values per field for the closed day (one aggregate query) against what the
        day's exports wrote (`totals`), and the slice objects in the folder (one listing)
        against the files they wrote: a late point, a lost or leftover object fails it."""
        start_ns, end_ns = day_bounds_ns(day)
        counts = self.source.field_counts(start_ns=start_ns, end_ns=end_ns, device_id=device_id)
        folder = device_folder(
            self.prefix, device_id=device_id, day=day, layout=self.settings.layout
        )
        listed = [
            k for k in self.store.list_keys(folder) if slice_offset_of(k[len(folder) :]) is not None
        ]
        return Reconciliation(
            device_id,
            day,
            SECONDS_PER_DAY,
            exported_rows=totals.rows if totals else 0,
            files=len(listed),
            field_counts=counts.get(device_id, dict.fromkeys(self.source.columns.field_names, 0)),
            exported_field_counts=dict(totals.counts) if totals else None,
            expected_files=totals.files if totals else None,
            unknown=totals is None,
        )
