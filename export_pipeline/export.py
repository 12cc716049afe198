"""The one export routine: a device's ranges of UTC days, from InfluxDB into a dataset in S3.

Every caller (the assets, the continuous jobs) exports through `export_device`, which owns the
rules they share: ranges in time order, transient failures retried, the device's progress
carried only over contiguous coverage (`progress.py`), and every day that an export closes
reconciled against InfluxDB. Callers differ only in how they pick ranges and how they record the
outcome. How a range becomes objects is the dataset's business (`slices.py`, `daily.py`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from queue import Empty, Full, Queue, SimpleQueue
from typing import Protocol

import pyarrow as pa

from export_pipeline.progress import DayTotals, Progress, carried
from export_pipeline.reconciliation import Reconciliation
from export_pipeline.retries import with_retries
from export_pipeline.schema import FIELD_COLUMNS, timestamp_of
from export_pipeline.slicing import SECONDS_PER_DAY, DayRange

OnRetry = Callable[[BaseException, float], None]


class EmptyReadRefused(RuntimeError):
    """InfluxDB answered with no rows where S3 holds exported objects: deleting them is refused."""


class Stopped(Exception):
    """The export was asked to stop (SIGTERM) and did, at a slice boundary."""


class ReconciliationFailed(RuntimeError):
    """A closed day could not be reconciled (not: it was reconciled and did not match)."""


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
    field_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELD_COLUMNS, 0))

    def add(self, rows: pa.RecordBatch) -> None:
        """Count a batch of exported rows in."""
        self.rows += rows.num_rows
        for name in FIELD_COLUMNS:
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


@dataclass(frozen=True)
class Exported:
    """A range complete in S3, and the device's progress once it is."""

    piece: DayRange
    report: ExportReport
    progress: Progress | None

    @property
    def exported_through(self) -> datetime | None:
        return None if self.progress is None else self.progress.through

    @property
    def day_totals(self) -> DayTotals | None:
        """What the range's day holds so far, where known."""
        if self.piece.start == 0:
            return self.report.totals
        if self.progress is not None and self.progress.day == self.piece.day:
            return self.progress.totals
        return None


@dataclass
class DeviceOutcome:
    """What one device's share of a run achieved."""

    device_id: str
    exported: list[Exported] = field(default_factory=list)
    reconciliations: list[Reconciliation] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)


def export_device(
    dataset: Dataset,
    device_id: str,
    chains: Sequence[Sequence[DayRange]],
    *,
    progress: Progress | None,
    first_due: datetime,
    retries: int,
    on_retry: OnRetry | None = None,
    stop: threading.Event | None = None,
) -> DeviceOutcome:
    """Export each chain of ranges in time order, then reconcile every day an export closed.

    A chain stops at its first range that keeps failing (after `retries` retries of transient
    errors), so the progress never passes a gap; the other chains go on. Nothing here raises:
    errors are collected in the outcome, so one device never holds back the others. Setting
    `stop` ends the export at the next slice boundary.
    """
    outcome = DeviceOutcome(device_id)
    for chain in chains:
        for piece in sorted(chain):
            if stop is not None and stop.is_set():
                outcome.errors.append(Stopped("stopped before starting"))
                return outcome

            fresh = progress is not None and piece.start_time >= progress.through

            def attempt(piece: DayRange = piece, fresh: bool = fresh) -> ExportReport:
                return dataset.export(device_id, piece, stop, fresh=fresh)

            try:
                report = with_retries(attempt, retries, on_retry)
            except Exception as error:
                outcome.errors.append(error)
                break
            progress = carried(progress, piece, report.totals, first_due)
            outcome.exported.append(Exported(piece, report, progress))
            if piece.end == SECONDS_PER_DAY and outcome.exported[-1].day_totals is None:
                # What the day's pieces hold is not known exactly (a device's first, partial
                # day, or overlapping pieces): the day is exported again, whole, to reconcile it.
                whole = DayRange.whole(piece.day)
                try:
                    report = with_retries(
                        partial(dataset.export, device_id, whole, stop), retries, on_retry
                    )
                except Exception as error:
                    outcome.errors.append(error)
                    break
                progress = carried(progress, whole, report.totals, first_due)
                outcome.exported[-1] = Exported(whole, report, progress)
    for exported in outcome.exported:
        if exported.piece.end != SECONDS_PER_DAY:
            continue

        def check(done: Exported = exported) -> Reconciliation:
            return dataset.reconcile(device_id, done.piece.day, done.day_totals)

        try:
            outcome.reconciliations.append(with_retries(check, retries, on_retry))
        except Exception as error:
            failed = ReconciliationFailed(f"reconciling {exported.piece.day}: {error}")
            failed.__cause__ = error
            outcome.errors.append(failed)
    return outcome


@dataclass(frozen=True)
class DeviceWork:
    """A device's share of a run: chains of ranges (see `export_device`) and its progress."""

    chains: Sequence[Sequence[DayRange]]
    progress: Progress | None = None
    first_due: datetime | None = None  # where a device without progress starts (see `carried`)


def export_fleet(
    dataset: Dataset,
    work: Mapping[str, DeviceWork],
    *,
    first_due: datetime,
    retries: int,
    concurrency: int,
    heartbeat_seconds: float,
    on_outcome: Callable[[DeviceOutcome], None],
    on_heartbeat: Callable[[int], None],
    on_retry: OnRetry | None = None,
) -> None:
    """Export each device's work, `concurrency` devices at a time. Outcomes are handed to
    `on_outcome` on the calling thread as devices finish (Dagster's run context is not
    thread-safe); `on_heartbeat(devices done)` is called every `heartbeat_seconds` whatever the
    devices do, so a live run is never silent for long, however long one device takes.

    An interrupt (SIGTERM reaches a run as one) stops queued devices from starting and running
    ones at their next slice boundary, so nothing partial becomes visible; then it is re-raised.
    """
    stop = threading.Event()

    def export_one(device_id: str) -> DeviceOutcome:
        return export_device(
            dataset,
            device_id,
            work[device_id].chains,
            progress=work[device_id].progress,
            first_due=work[device_id].first_due or first_due,
            retries=retries,
            on_retry=on_retry,
            stop=stop,
        )

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="device")
    # Finished devices arrive on a queue: waiting on the pending futures instead costs a waiter
    # on each of them per wake-up, quadratic in the fleet (~2 s of CPU at 1,000 devices).
    finished: SimpleQueue[Future[DeviceOutcome]] = SimpleQueue()
    remaining = len(work)
    beat = time.monotonic()
    try:
        for device_id in sorted(work):
            pool.submit(export_one, device_id).add_done_callback(finished.put)
        while remaining:
            wait_for = max(0.0, beat + heartbeat_seconds - time.monotonic())
            try:
                future: Future[DeviceOutcome] | None = finished.get(timeout=wait_for)
            except Empty:
                future = None
            if time.monotonic() >= beat + heartbeat_seconds:
                on_heartbeat(len(work) - remaining)
                beat = time.monotonic()
            if future is not None:
                remaining -= 1
                on_outcome(future.result())
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


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
