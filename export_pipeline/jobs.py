"""Jobs: `register_devices` (DEVICE_IDS → `devices` partitions), `export_due_slices`, the
batched run the continuous_export sensor requests, and `sweep_late_data`, which finds closed
device-days that changed in InfluxDB after they were reconciled."""

import threading
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from dagster import (
    Config,
    Failure,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)
from pydantic import Field

from export_pipeline.export import DeviceOutcome, export_device, export_devices
from export_pipeline.internals import pool_storage_connections
from export_pipeline.layout import device_root, devices_root
from export_pipeline.ledger import checkpoint_dates, reconciled_counts
from export_pipeline.metadata import (
    late_data_evaluation,
    materialization,
    reconciliation_evaluation,
)
from export_pipeline.partitions import DEVICES, registered_devices
from export_pipeline.planning import WorkItem, admit, closed_days, first_due
from export_pipeline.reconciliation import late_data
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
    slices_of,
)
from export_pipeline.retries import with_retries
from export_pipeline.runs import CONTINUOUS_JOB, busy_devices, is_dead, runs_in_flight
from export_pipeline.slicing import DayRange, day_bounds_ns


@op
def add_devices(context: OpExecutionContext, export: ExportResource) -> list[str]:
    """Registers every id in DEVICE_IDS, or none of them if any is unsafe."""
    if not export.device_ids:
        raise Failure("DEVICE_IDS is empty: set it to the device ids to export, comma-separated")
    _, refused = admit(export.device_ids)
    if refused:
        raise Failure("DEVICE_IDS has unsafe ids, none were registered: " + "; ".join(refused))
    known = set(context.instance.get_dynamic_partitions(DEVICES))
    new = [device_id for device_id in export.device_ids if device_id not in known]
    context.instance.add_dynamic_partitions(DEVICES, new)
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
    # Each device's checkpoint (epoch seconds) when the sensor planned the run, or where it
    # starts a device never exported: what a range must join to carry the checkpoint on.
    checkpoints: dict[str, float] = Field(default_factory=dict)


def run_config_for(items: list[WorkItem], resume_from: Mapping[str, datetime]) -> dict[str, Any]:
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
    devices = {item.device_id for item in items}
    checkpoints = {d: moment.timestamp() for d, moment in resume_from.items() if d in devices}
    config = ExportSlicesConfig(work=work, checkpoints=checkpoints)
    return {"ops": {"export_slices": {"config": config.model_dump()}}}


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

    Each device's due ranges go in time order, then each whole-day re-export on its own (see
    `export.export_device`). A materialization (with `exported_through`) is recorded for every
    range complete in S3, and a reconciliation for every day that closed. A failing device does
    not hold back the others; the run fails at the end, naming it. While devices are in progress
    the run logs a heartbeat, so the sensor can tell a slow run from a dead one.
    """
    pool_storage_connections(context.instance)
    settings = export.settings()
    due: dict[str, list[DayRange]] = {}
    again: dict[str, list[DayRange]] = {}
    for item in config.work:
        piece = DayRange(date.fromisoformat(item.date), item.start, item.end)
        (again if item.reexport else due).setdefault(item.device_id, []).append(piece)
        due.setdefault(item.device_id, [])
    failures: list[str] = []

    def on_retry(error: BaseException, delay: float) -> None:
        context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

    def record(outcome: DeviceOutcome) -> None:
        for exported in outcome.exported:
            context.log_event(materialization(exported, clock.now()))
        for result in outcome.reconciliations:
            # log_event records check evaluations too; its type hint is narrower.
            context.log_event(reconciliation_evaluation(result))  # type: ignore[arg-type]
        for error in outcome.errors:
            context.log.error(f"{outcome.device_id}: {error}")
            failures.append(f"{outcome.device_id}: {error}")

    with slices_of(influxdb, s3, settings, settings.concurrency) as slices:

        def export_one(device_id: str, stop: threading.Event) -> DeviceOutcome:
            planned = config.checkpoints.get(device_id)
            # A run queued before checkpoints were passed: its due ranges start at it.
            starts = [piece.start_time for piece in due[device_id]]
            checkpoint = (
                datetime.fromtimestamp(planned, UTC)
                if planned is not None
                else min(starts, default=None)
            )
            return export_device(
                slices,
                device_id,
                [due[device_id], *([piece] for piece in again.get(device_id, []))],
                checkpoint=checkpoint,
                first_due=checkpoint or clock.now(),
                retries=settings.retries,
                on_retry=on_retry,
                stop=stop,
            )

        export_devices(
            list(due),
            export_one,
            concurrency=settings.concurrency,
            heartbeat_seconds=max(5.0, settings.stale_run_after / 4),
            on_outcome=record,
            on_heartbeat=lambda done: context.log.info(
                f"exporting: {done} of {len(due)} devices done"
            ),
        )
    if failures:
        raise Failure(
            f"{len(failures)} errors in {len(due)} devices; their remaining slices are "
            "requested again on the next tick: " + "; ".join(failures[:20])
        )


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
    wall = datetime.now(UTC)
    live = [run for run in runs_in_flight(context.instance) if not is_dead(run, wall, stale)]
    busy = [device_root(s3.prefix, device_id=device_id) for device_id in sorted(busy_devices(live))]
    aborted = with_retries(
        lambda: s3.store().abort_abandoned_uploads(devices_root(s3.prefix), wall - stale, busy),
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
    window = checkpoint_dates(
        now, first_due=first_due(now, settings), start_date=settings.start_date
    )
    reconciled = reconciled_counts(instance, fleet, closed_days(window, now, settings))
    days = sorted({day for _, day in reconciled})
    counts_by_day: dict[date, dict[str, dict[str, int]]] = {}
    with influxdb.source() as source:
        for day in days:
            start_ns, end_ns = day_bounds_ns(day)
            count = partial(
                source.field_counts,
                start_ns=start_ns,
                end_ns=end_ns,
                timeout_seconds=COUNT_TIMEOUT_SECONDS,
            )
            counts_by_day[day] = with_retries(count, settings.retries)
    changed = late_data(reconciled, counts_by_day)
    for late in changed:
        context.log.warning(f"{late.day} {late.device_id}: {late.description}; re-exporting")
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
