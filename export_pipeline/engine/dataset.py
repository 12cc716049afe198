"""What a dataset is to the export routine: how it writes a range and checks a closed day
(`Dataset`), what an export of a range did (`ExportReport`), and the streaming helpers the
datasets share."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from queue import Empty, Full, Queue
from typing import Protocol

import pyarrow as pa

from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.progress import DayTotals
from export_pipeline.engine.reconciliation import Reconciliation
from export_pipeline.engine.schema import timestamp_of
from export_pipeline.settings import SEED_FIELDS


class EmptyReadRefused(RuntimeError):
    """InfluxDB answered with no rows where S3 holds exported objects: deleting them is refused."""


class Stopped(Exception):
    """The export was asked to stop (SIGTERM) and did, at a slice boundary."""


@dataclass
class ExportReport:
    """What one export of a range did; becomes the materialization's metadata."""

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
    fields: tuple[str, ...] = SEED_FIELDS  # the exported fields (`Columns.field_names`)
    field_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.fields:
            self.field_counts.setdefault(name, 0)

    def add(self, rows: pa.RecordBatch) -> None:
        """Count a batch of exported rows in."""
        self.rows += rows.num_rows
        for name in self.fields:
            column = rows.column(name)
            self.field_counts[name] += len(column) - column.null_count
        if rows.num_rows:
            stamps = rows.column("timestamp")
            self.first_timestamp = self.first_timestamp or timestamp_of(stamps[0])
            self.last_timestamp = timestamp_of(stamps[-1])

    @property
    def totals(self) -> DayTotals:
        return DayTotals(self.rows, len(self.files_written), dict(self.field_counts))


class Dataset(Protocol):
    """A dataset in S3 fed from InfluxDB: how a range is written, how a closed day is checked."""

    def export(
        self,
        device_id: str,
        piece: DayRange,
        stop: threading.Event | None = None,
        *,
        fresh: bool = False,
    ) -> ExportReport:
        """Write `piece`; `fresh`: it lies beyond what was exported, so nothing of ours can be
        there to replace (the day's reconciliation finds any leftover)."""
        ...

    def reconcile(self, device_id: str, day: date, totals: DayTotals | None) -> Reconciliation:
        """Check a closed day; `totals`: what its exports wrote, where known."""
        ...


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


def timed(batches: Iterator[pa.RecordBatch], report: ExportReport) -> Iterator[pa.RecordBatch]:
    """Yield `batches`, adding the time spent waiting on the source to `report.read_seconds`."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        report.read_seconds += time.perf_counter() - started
        if batch is None:
            return
        yield batch
