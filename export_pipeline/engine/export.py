"""The one export routine: a device's ranges of UTC days, from InfluxDB into a dataset in S3.

Every caller (the assets, the continuous jobs) exports through `export_device`, which owns the
rules they share: ranges in time order, transient failures retried, the device's progress
carried only over contiguous coverage (`progress.py`), and every day that an export closes
reconciled against InfluxDB. Callers differ only in how they pick ranges and how they record the
outcome. How a range becomes objects is the dataset's business (`slice_files.py`, `day_files.py`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from queue import Empty, SimpleQueue

from export_pipeline.engine.dataset import Dataset, ExportReport, Stopped
from export_pipeline.engine.grid import SECONDS_PER_DAY, DayRange
from export_pipeline.engine.progress import DayTotals, Progress, carried
from export_pipeline.engine.reconciliation import Reconciliation
from export_pipeline.engine.retries import with_retries

OnRetry = Callable[[BaseException, float], None]


class ReconciliationFailed(RuntimeError):
    """A closed day could not be reconciled (not: it was reconciled and did not match)."""


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
