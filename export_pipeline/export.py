"""Export one device-day (or a range of its slices) from InfluxDB into its S3 folder.

The folder is made equal to InfluxDB's content for the range: every slice with rows is written
under its fixed key, and our objects of slices that no longer have rows are deleted. Rerunning
therefore rewrites the same keys and never duplicates a row. Stale objects are deleted only after
every upload succeeded, so a failed run loses nothing that was exported before.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from itertools import pairwise
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Protocol

import numpy as np
import pyarrow as pa

from export_pipeline.layout import device_folder, slice_key, slice_offset_of, validate_device_id
from export_pipeline.retries import with_retries
from export_pipeline.schema import to_export
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import (
    NS_PER_SECOND,
    SECONDS_PER_DAY,
    DayRange,
    Slice,
    check_interval,
    day_bounds_ns,
    slice_offsets,
)
from export_pipeline.writers import ObjectStore, SliceFile


class EmptyReadRefused(RuntimeError):
    """InfluxDB answered with no rows where S3 holds exported objects: deleting them is refused."""


class Stopped(Exception):
    """The export was asked to stop (SIGTERM) and did, at a slice boundary."""


UPLOAD_THREADS = 8
MAX_FILES_IN_FLIGHT = 16  # bounds the temporary disk an export holds while uploads catch up


class Source(Protocol):
    def read(
        self, device_id: str, start_ns: int, end_ns: int, batch_rows: int = ...
    ) -> Iterator[pa.RecordBatch]: ...


@dataclass
class ExportReport:
    """What one export did; becomes the materialization's metadata."""

    device_id: str
    day: date
    folder_uri: str
    rows: int = 0
    bytes_written: int = 0
    files_written: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    first_timestamp: datetime | None = None
    last_timestamp: datetime | None = None
    read_seconds: float = 0.0
    write_seconds: float = 0.0


def split_by_slice(
    times_ns: pa.Array, day: date, interval_seconds: int
) -> Iterator[tuple[int, int, int]]:
    """Cut time-sorted timestamps into runs of one slice: (slice offset, first row, row count)."""
    offsets = slice_offsets(times_ns, day, interval_seconds).to_numpy()
    steps = np.diff(offsets)
    if np.any(steps < 0):
        raise ValueError("InfluxDB returned points out of time order; cannot slice them safely")
    bounds = [0, *(np.flatnonzero(steps) + 1).tolist(), len(offsets)]
    for start, end in pairwise(bounds):
        if end > start:
            yield int(offsets[start]), start, end - start


def export_device_day(
    source: Source,
    store: ObjectStore,
    prefix: str,
    device_id: str,
    day: date,
    settings: ExportSettings,
    start_offset: int = 0,
    end_offset: int = SECONDS_PER_DAY,
    stop: threading.Event | None = None,
) -> ExportReport:
    """Export the slices of `day` in `[start_offset, end_offset)` seconds after midnight UTC.

    Setting `stop` ends the export at the next slice boundary with `Stopped`: the objects already
    uploaded are complete, and nothing is deleted.
    """
    validate_device_id(device_id)
    interval = settings.interval_seconds
    check_interval(interval)
    if start_offset % interval or end_offset % interval or not 0 <= start_offset <= end_offset:
        raise ValueError(f"[{start_offset}, {end_offset}) is not a range of whole slices")
    folder = device_folder(prefix, device_id, day, settings.layout)
    report = ExportReport(device_id, day, store.uri(folder))
    if start_offset == end_offset:
        return report
    existing = store.list_keys(folder)

    day_ns, _ = day_bounds_ns(day)
    start_ns = day_ns + start_offset * NS_PER_SECOND
    end_ns = day_ns + min(end_offset, SECONDS_PER_DAY) * NS_PER_SECOND
    written: set[str] = set()
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="export-") as workdir,
        ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload") as pool,
    ):
        in_flight: deque[Future[None]] = deque()
        current: tuple[str, SliceFile] | None = None

        def finish() -> None:
            nonlocal current
            if current is None:
                return
            key, slice_file = current
            current = None
            report.bytes_written += slice_file.close()
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped before uploading {key}")
            while len(in_flight) >= MAX_FILES_IN_FLIGHT:
                in_flight.popleft().result()
            in_flight.append(pool.submit(_upload, store, slice_file, key))
            written.add(key)

        reading = prefetched(source.read(device_id, start_ns, end_ns, settings.batch_size))
        batches = _timed(reading, report)
        try:
            for raw in batches:
                rows = to_export(raw, device_id)
                for offset, first, count in split_by_slice(raw.column("time"), day, interval):
                    piece = Slice(day, offset, interval)
                    key = slice_key(prefix, device_id, piece, settings.layout, settings.format)
                    if current is None or current[0] != key:
                        if key in written:
                            raise ValueError("InfluxDB returned points out of time order")
                        finish()
                        path = Path(workdir) / f"{offset:05d}.{settings.format}"
                        current = (key, SliceFile(path, settings.format, settings.batch_size))
                    current[1].write(rows.slice(first, count))
                report.rows += rows.num_rows
                if rows.num_rows:
                    stamps = rows.column("timestamp")
                    report.first_timestamp = report.first_timestamp or stamps[0].as_py()
                    report.last_timestamp = stamps[-1].as_py()
            finish()
        except BaseException:
            if current is not None:
                current[1].abandon()
            raise
        finally:
            reading.close()  # stops and joins the reader thread, whatever happened
        for future in in_flight:
            future.result()
    # Everything that is not waiting on InfluxDB: converting, encoding and uploading.
    report.write_seconds = time.perf_counter() - started - report.read_seconds

    report.files_written = sorted(store.uri(key) for key in written)
    stale = _stale_keys(existing, folder, written, start_offset, end_offset)
    if stale and not written:
        # InfluxDB's CSV answer turns some query errors (and a dropped database or an expired
        # retention period) into an empty body; emptying a folder on that word alone could
        # destroy the only remaining copy.
        raise EmptyReadRefused(
            f"InfluxDB returned no rows for {device_id} on {day} in [{start_offset}, "
            f"{end_offset}) s, but {report.folder_uri} holds {len(stale)} objects there; "
            "nothing was deleted. If the points were removed from InfluxDB on purpose, delete "
            "the objects by hand."
        )
    store.delete(stale)
    report.files_deleted = [store.uri(key) for key in stale]
    return report


def prefetched(
    batches: Iterator[pa.RecordBatch], depth: int = 2
) -> Generator[pa.RecordBatch, None, None]:
    """Read `batches` on a thread of their own, at most `depth` ahead of the consumer.

    Without it InfluxDB sits idle (TCP back-pressure) while a batch is encoded and uploaded, and
    an export takes read + write time instead of the longer of the two. Memory stays bounded by
    `depth` queued batches plus the one being read; an error in the reader is raised in the
    consumer. Closing the generator (or an error in the consumer) stops and joins the reader.
    """
    done = object()
    queue: Queue[object] = Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Queue `item` unless the consumer has gone; every put gives up when it has."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(done)
        except BaseException as error:
            offer(error)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    reader = threading.Thread(target=produce, name="influx-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while True:  # free a reader blocked on a full queue
            try:
                queue.get_nowait()
            except Empty:
                break
        reader.join()


def _timed(batches: Iterator[pa.RecordBatch], report: ExportReport) -> Iterator[pa.RecordBatch]:
    """Yield `batches`, adding the time spent waiting on the source to `report.read_seconds`."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        report.read_seconds += time.perf_counter() - started
        if batch is None:
            return
        yield batch


def _upload(store: ObjectStore, slice_file: SliceFile, key: str) -> None:
    try:
        store.upload(slice_file.path, key, slice_file.fmt)
    finally:
        slice_file.path.unlink(missing_ok=True)


def _stale_keys(
    existing: dict[str, int], folder: str, written: set[str], start_offset: int, end_offset: int
) -> list[str]:
    """Our objects in the exported range that this export did not write (either format)."""
    stale = []
    for key in existing:
        offset = slice_offset_of(key[len(folder) :])
        if offset is not None and start_offset <= offset < end_offset and key not in written:
            stale.append(key)
    return sorted(stale)


def export_device_ranges(
    source: Source,
    store: ObjectStore,
    prefix: str,
    device_id: str,
    ranges: list[DayRange],
    settings: ExportSettings,
    on_retry: Callable[[BaseException, float], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[tuple[DayRange, ExportReport]], Exception | None]:
    """Export a device's ranges in time order, stopping at the first that keeps failing.

    Returns the ranges done (each complete in S3) and the error that stopped the rest, so the
    device's checkpoint can advance over exactly the slices that were exported.
    """
    done: list[tuple[DayRange, ExportReport]] = []
    for piece in sorted(ranges):

        def attempt(piece: DayRange = piece) -> ExportReport:
            return export_device_day(
                source, store, prefix, device_id, piece.day, settings, piece.start, piece.end, stop
            )

        if stop is not None and stop.is_set():
            return done, Stopped("stopped before starting")
        try:
            done.append((piece, with_retries(attempt, settings.retries, on_retry)))
        except Exception as error:
            return done, error
    return done, None
