"""Jobs: `register_devices` (DEVICE_IDS → `devices` partitions), `export_due_slices`, the
batched run the continuous_export sensor requests, and `sweep_late_data`, which finds closed
device-days that changed in InfluxDB after they were reconciled."""

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from dagster import (
    AssetMaterialization,
    Config,
    DagsterInstance,
    Failure,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from export_pipeline.assets import report_metadata
from export_pipeline.checks import late_data_evaluation, reconciliation_evaluation
from export_pipeline.export import UPLOAD_THREADS, ExportReport, export_device_ranges
from export_pipeline.layout import DeviceIdError, device_root, devices_root, validate_device_id
from export_pipeline.ledger import (
    CONTINUOUS_JOB,
    TELEMETRY_EXPORT,
    busy_devices,
    checkpoint_dates,
    reconciled_counts,
)
from export_pipeline.partitions import devices, registered_devices
from export_pipeline.planning import WorkItem, first_due
from export_pipeline.reconciliation import Reconciliation, late_data, reconcile
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
)
from export_pipeline.retries import with_retries
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import SECONDS_PER_DAY, DayRange, closed_until, day_bounds_ns


def refused_ids(device_ids: list[str]) -> list[str]:
    """The reason for each id that cannot be a partition key and S3 path segment."""
    reasons = []
    for device_id in device_ids:
        try:
            validate_device_id(device_id)
        except DeviceIdError as error:
            reasons.append(str(error))
    return reasons


@op
def add_devices(context: OpExecutionContext, export: ExportResource) -> list[str]:
    """Registers every id in DEVICE_IDS, or none of them if any is unsafe."""
    if not export.device_ids:
        raise Failure("DEVICE_IDS is empty: set it to the device ids to export, comma-separated")
    refused = refused_ids(export.device_ids)
    if refused:
        raise Failure("DEVICE_IDS has unsafe ids, none were registered: " + "; ".join(refused))
    assert devices.name is not None
    known = set(context.instance.get_dynamic_partitions(devices.name))
    new = [device_id for device_id in export.device_ids if device_id not in known]
    context.instance.add_dynamic_partitions(devices.name, new)
    context.log.info(f"registered {len(new)} new devices: {', '.join(new) or '(none)'}")
    return new


@job
def register_devices() -> None:
    add_devices()


class WorkItemConfig(Config):
    device_id: str
    date: str
    start: int
    end: int
    reexport: bool = False  # a closed day exported again because its reconciliation failed


class ExportSlicesConfig(Config):
    work: list[WorkItemConfig]


def run_config_for(items: list[WorkItem]) -> dict[str, Any]:
    """The run config of an export_due_slices run over `items`."""
    work = [
        WorkItemConfig(
            device_id=item.device_id,
            date=item.range.day.isoformat(),
            start=item.range.start,
            end=item.range.end,
            reexport=item.reexport,
        )
        for item in items
    ]
    return {"ops": {"export_slices": {"config": ExportSlicesConfig(work=work).model_dump()}}}


def pool_storage_connections(instance: DagsterInstance) -> None:
    """Hold pooled PostgreSQL connections for this run's event writes.

    Dagster's PostgreSQL storage opens a new connection per statement (NullPool); measured here,
    a materialization event then costs ~12 ms, and ~3.3 ms over the pooled engine the webserver
    uses. A run that records one materialization per device pays that 1,000 times a tick. The
    pool lives as long as the run's process; a PostgreSQL restart during a run fails the run,
    and the next tick exports what it left.
    """
    for storage in (instance.event_log_storage, instance.run_storage):
        optimize = getattr(storage, "optimize_for_webserver", None)
        if optimize is not None:
            optimize(statement_timeout=0, pool_recycle=3600, max_overflow=4)


@dataclass
class DeviceOutcome:
    """What one device's share of a run achieved."""

    done: list[tuple[DayRange, ExportReport]]
    errors: list[str]
    reconciliations: list[Reconciliation]


@op
def export_slices(
    context: OpExecutionContext,
    config: ExportSlicesConfig,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """Exports the due slices of many devices, several devices at a time.

    Each device's ranges go in time order and stop at its first lasting failure; a materialization
    (with `exported_through`) is recorded only for ranges complete in S3, and a device-day that
    closes is reconciled. A failing device does not hold back the others; the run fails at the
    end, naming it. While devices are in progress the run logs a heartbeat, so the sensor can tell
    a slow run from a dead one.
    """
    pool_storage_connections(context.instance)
    settings = export.settings()
    by_device: dict[str, list[tuple[DayRange, bool]]] = {}
    for item in config.work:
        piece = DayRange(date.fromisoformat(item.date), item.start, item.end)
        by_device.setdefault(item.device_id, []).append((piece, item.reexport))
    store = s3.store(connections=settings.concurrency * UPLOAD_THREADS)
    with influxdb.source(connections=settings.concurrency) as source:
        with_retries(source.check, settings.retries)
        with_retries(store.check, settings.retries)

        def on_retry(error: BaseException, delay: float) -> None:
            context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

        def export_device(
            device_id: str, work: list[tuple[DayRange, bool]], stop: threading.Event
        ) -> DeviceOutcome:
            """The due ranges in order (stopping at the first lasting failure, so the checkpoint
            never passes a gap), then each re-export on its own, then the reconciliation of every
            day that closed. No failure here stops the other devices."""
            outcome = DeviceOutcome([], [], [])
            due = [piece for piece, again in work if not again]
            chains = [due] + [[piece] for piece, again in work if again]
            for chain in chains:
                done, error = export_device_ranges(
                    source, store, s3.prefix, device_id, chain, settings, on_retry, stop
                )
                outcome.done += done
                if error is not None:
                    outcome.errors.append(str(error))
            for piece, _ in outcome.done:
                if piece.end != SECONDS_PER_DAY:
                    continue

                def check(day: date = piece.day) -> Reconciliation:
                    return reconcile(
                        source, store, s3.prefix, device_id, day, settings.layout, SECONDS_PER_DAY
                    )

                try:
                    outcome.reconciliations.append(with_retries(check, settings.retries))
                except Exception as error:
                    outcome.errors.append(f"reconciling {piece.day}: {error}")
            return outcome

        failures = run_devices_in_parallel(context, by_device, export_device, settings, clock)
    if failures:
        raise Failure(
            f"{len(failures)} of {len(by_device)} devices failed; their remaining slices are "
            "requested again on the next tick: " + "; ".join(failures[:20])
        )


def run_devices_in_parallel(
    context: OpExecutionContext,
    by_device: dict[str, list[tuple[DayRange, bool]]],
    export_device: Callable[[str, list[tuple[DayRange, bool]], threading.Event], DeviceOutcome],
    settings: ExportSettings,
    clock: ClockResource,
) -> list[str]:
    """Export devices on a thread pool, recording events from this (the run's) thread."""
    heartbeat = max(5.0, settings.stale_run_after / 4)
    failures: list[str] = []
    stop = threading.Event()
    pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="device")
    pending = {
        pool.submit(export_device, device_id, ranges, stop): device_id
        for device_id, ranges in by_device.items()
    }
    try:
        while pending:
            finished, _ = wait(pending, timeout=heartbeat, return_when=FIRST_COMPLETED)
            if not finished:
                context.log.info(
                    f"exporting: {len(by_device) - len(pending)} of {len(by_device)} devices done"
                )
            for future in finished:
                device_id = pending.pop(future)
                outcome = future.result()
                for piece, report in outcome.done:
                    context.log_event(
                        AssetMaterialization(
                            asset_key=TELEMETRY_EXPORT,
                            partition=f"{piece.day.isoformat()}|{device_id}",
                            metadata=report_metadata(report, piece, piece.end_time, clock.now()),
                        )
                    )
                for result in outcome.reconciliations:
                    # log_event records check evaluations too; its type hint is narrower.
                    context.log_event(reconciliation_evaluation(result))  # type: ignore[arg-type]
                for problem in outcome.errors:
                    context.log.error(f"{device_id}: {problem}")
                    failures.append(f"{device_id}: {problem}")
    except BaseException:
        # SIGTERM reaches the run as an interrupt here: queued devices never start and running
        # ones stop at their next slice boundary, so nothing partial becomes visible; the next
        # tick exports what is left.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failures


@job(name=CONTINUOUS_JOB, executor_def=in_process_executor)
def export_due_slices() -> None:
    export_slices()


@op
def abort_abandoned_uploads(
    context: OpExecutionContext, s3: ExportBucketResource, export: ExportResource
) -> None:
    """Aborts the multipart uploads in the device folders that no run is exporting now and
    that are older than EXPORT_STALE_RUN_SECONDS: uploads cut off with their connection."""
    settings = export.settings()
    stale = timedelta(seconds=settings.stale_run_after)
    busy, _ = busy_devices(context.instance, stale)
    live = [device_root(s3.prefix, device_id) for device_id in sorted(busy)]
    aborted = with_retries(
        lambda: s3.store().abort_abandoned_uploads(
            devices_root(s3.prefix), datetime.now(UTC) - stale, live
        ),
        settings.retries,
    )
    for key in aborted:
        context.log.warning(f"aborted an abandoned multipart upload of {key}")
    context.log.info(f"{len(aborted)} abandoned multipart uploads aborted")


# A day is counted in one query for the whole fleet (split by the hour, a sparse fleet paid
# 10 times as much: InfluxDB plans every series again per query). 1,000 devices at 1 Hz put 86 M
# points in a day, ~95 s of counting for InfluxDB 1.6: beyond INFLUXDB_TIMEOUT_SECONDS, so this
# query may take up to this long.
COUNT_TIMEOUT_SECONDS = 900.0


@op
def find_late_data(
    context: OpExecutionContext,
    influxdb: InfluxDBResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """Marks the reconciliation of each closed device-day that InfluxDB has changed since as
    failed; the continuous_export sensor then exports those days again.

    Data can arrive days late (a device that was offline uploads its buffer). The day-close
    reconciliation recorded InfluxDB's count of values per field; one aggregate query per closed
    day in the sensor's window counts them again for the whole fleet. A count that grew means
    points were added after the export.
    """
    settings, now, instance = export.settings(), clock.now(), context.instance
    fleet = registered_devices(instance, settings)
    until = closed_until(now, settings.interval_seconds, settings.lateness_seconds)
    window = checkpoint_dates(now, first_due(now, settings), settings.start_date)
    reconciled = reconciled_counts(instance, fleet, [day for day in window if day < until.date()])
    days = sorted({day for _, day in reconciled})
    counts_by_day: dict[date, dict[str, dict[str, int]]] = {}
    with influxdb.source() as source:
        for day in days:
            start_ns, end_ns = day_bounds_ns(day)
            count = partial(source.field_counts, start_ns, end_ns, COUNT_TIMEOUT_SECONDS)
            counts_by_day[day] = with_retries(count, settings.retries)
    changed = late_data(reconciled, counts_by_day)
    for late in changed:
        context.log.warning(f"{late.day}|{late.device_id}: {late.description}; re-exporting")
        # log_event records check evaluations too; its type hint is narrower.
        context.log_event(late_data_evaluation(late))  # type: ignore[arg-type]
    context.log.info(
        f"swept {len(reconciled)} reconciled device-days over {len(days)} days: "
        f"{len(changed)} changed since"
    )


@job(executor_def=in_process_executor)
def sweep_late_data() -> None:
    """Late data, and the leftovers of uploads cut off mid-way."""
    find_late_data()
    abort_abandoned_uploads()
