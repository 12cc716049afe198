"""The datasets, as Dagster assets on device x date partitions, fed by InfluxDB:

- `telemetry_export`: the slices, one file per interval of a device-day (fresh data);
- `telemetry_daily`: one file per closed device-day (analytics and history), through the
  `day_files` IO manager, so downstream assets take it as an input;
- `influxdb_telemetry`: InfluxDB's measurement, an external asset both are read from.

A run of either asset may cover many partitions (a backfill runs as few runs, see the backfill
policy): their device-days are exported `EXPORT_CONCURRENCY` devices at a time through the one
routine, `export.export_device`, and a device-day that fails is named in the run's failure.
"""

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date, datetime
from pathlib import Path

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetOut,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MultiPartitionsDefinition,
    multi_asset,
)

from export_pipeline.daily import StagedDay, StagedDayFiles
from export_pipeline.export import Dataset, DeviceOutcome, DeviceWork, export_fleet
from export_pipeline.influx import shared_count_groups
from export_pipeline.internals import (
    add_partition_metadata,
    batched_event_writes,
    pool_storage_connections,
)
from export_pipeline.ledger import progress_of, record_progress
from export_pipeline.metadata import (
    DAILY_RECONCILIATION,
    INFLUXDB,
    RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    materialization_metadata,
    reconciliation_evaluation,
)
from export_pipeline.partitions import DeviceDay
from export_pipeline.planning import closed_part, due_until, first_due
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
    day_files_of,
    slices_of,
)
from export_pipeline.runs import HEARTBEAT_SECONDS, mark_process
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import DayRange, days_closed_by

influxdb_telemetry = AssetSpec(
    INFLUXDB,
    description="The InfluxDB measurement (INFLUXDB_MEASUREMENT in INFLUXDB_BUCKET) both datasets "
    "are read from; not materialized by Dagster.",
    kinds={"influxdb"},
    group_name="telemetry",
)


def export_partitions(
    context: AssetExecutionContext,
    dataset: Dataset,
    work: Mapping[str, DeviceWork],
    *,
    settings: ExportSettings,
    first_due: datetime,
) -> list[DeviceOutcome]:
    """Export the run's device-days, several devices at a time, and fail the run naming every
    device-day that failed (a run records its partitions all or none); else their outcomes."""
    mark_process(context.instance, context.run.run_id)
    pool_storage_connections(context.instance)  # a run records an event per device-day
    outcomes: list[DeviceOutcome] = []

    def on_retry(error: BaseException, delay: float) -> None:
        context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

    export_fleet(
        dataset,
        work,
        first_due=first_due,
        retries=settings.retries,
        concurrency=settings.concurrency,
        heartbeat_seconds=HEARTBEAT_SECONDS,
        on_outcome=outcomes.append,
        on_heartbeat=lambda done: context.log.info(f"exporting: {done} of {len(work)} devices"),
        on_retry=on_retry,
    )
    failures = [f"{o.device_id}: {error}" for o in outcomes for error in o.errors]
    if failures:
        raise Failure(
            f"{len(failures)} of {len(context.partition_keys)} device-days failed, nothing of "
            "this run is recorded: " + "; ".join(failures[:20])
        )
    return outcomes


def record(
    context: AssetExecutionContext,
    outcomes: Sequence[DeviceOutcome],
    now: datetime,
    check: AssetCheckKey,
) -> None:
    """Each exported device-day's metadata on its own materialization, and its reconciliation."""
    add_partition_metadata(
        context,
        check.asset_key,
        {
            DeviceDay(outcome.device_id, exported.piece.day).key: materialization_metadata(
                exported, now
            )
            for outcome in outcomes
            for exported in outcome.exported
        },
    )
    for outcome in outcomes:
        for result in outcome.reconciliations:
            # log_event records check evaluations too; its type hint is narrower.
            context.log_event(reconciliation_evaluation(result, check))


def ranges_by_device(
    context: AssetExecutionContext, range_of: Callable[[date], DayRange]
) -> dict[str, list[DayRange]]:
    """The run's partitions as each device's ranges, in time order."""
    found: dict[str, list[DayRange]] = {}
    for device_id, day in sorted(map(DeviceDay.of, context.partition_keys)):
        found.setdefault(device_id, []).append(range_of(day))
    return found


def build_telemetry_export(
    device_days: MultiPartitionsDefinition, settings: ExportSettings
) -> AssetsDefinition:
    # A multi-asset, as telemetry_daily: one materialization per partition, each with its own
    # metadata (`add_partition_metadata`).
    @multi_asset(
        name=TELEMETRY_EXPORT.path[-1],
        specs=[
            AssetSpec(
                TELEMETRY_EXPORT,
                deps=[INFLUXDB],
                partitions_def=device_days,
                kinds={"s3", "influxdb"},
                group_name="telemetry",
                description="One device's telemetry for one UTC day, one file per slice: fresh.",
            )
        ],
        can_subset=True,
        backfill_policy=BackfillPolicy.multi_run(settings.devices_per_run),
    )
    def telemetry_export(
        context: AssetExecutionContext,
        influxdb: InfluxDBResource,
        s3: ExportBucketResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> Iterator[MaterializeResult]:
        """Makes each device-day's folder equal to InfluxDB's content for the day: the same
        slices get the same keys, and objects of slices without rows are deleted, so reruns
        never duplicate a row. For the current day only the slices closed for
        EXPORT_LATENESS_SECONDS are exported; the continuous_export sensor adds the rest as they
        close. A closed day is reconciled with InfluxDB (the `reconciliation` check).
        """
        settings, now = export.settings(), clock.now()
        start = first_due(now, settings)
        days = ranges_by_device(context, lambda day: closed_part(day, now, settings))
        known = progress_of(context.instance, days)
        work = {device: DeviceWork([ranges], known.get(device)) for device, ranges in days.items()}
        counts = shared_count_groups(days_closed_by(days))
        with slices_of(
            influxdb, s3, settings, settings.concurrency, shared_counts=counts
        ) as slices:
            outcomes = export_partitions(context, slices, work, settings=settings, first_due=start)
        moved = {o.device_id: o.exported[-1].progress for o in outcomes if o.exported}
        record_progress(context.instance, {d: p for d, p in moved.items() if p is not None})
        record(context, outcomes, clock.now(), RECONCILIATION)
        with batched_event_writes():  # a materialization per partition, in one INSERT
            yield MaterializeResult(asset_key=TELEMETRY_EXPORT)

    return telemetry_export


def build_telemetry_daily(
    device_days: MultiPartitionsDefinition, settings: ExportSettings
) -> AssetsDefinition:
    @multi_asset(
        name=TELEMETRY_DAILY.path[-1],
        outs={
            TELEMETRY_DAILY.path[-1]: AssetOut(
                key=TELEMETRY_DAILY,
                io_manager_key="day_files",
                kinds={"s3", "parquet"},
                group_name="telemetry",
                description="One device's telemetry for one closed UTC day, as one Parquet "
                "file: for analytics and history.",
                is_required=False,
            )
        },
        deps=[INFLUXDB],
        partitions_def=device_days,
        can_subset=True,
        backfill_policy=BackfillPolicy.multi_run(settings.devices_per_run),
    )
    def telemetry_daily(
        context: AssetExecutionContext,
        influxdb: InfluxDBResource,
        s3: ExportBucketResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> Iterator[MaterializeResult]:
        """Writes each closed device-day, read from InfluxDB in one streamed query, as one
        Parquet file; the `day_files` IO manager publishes them, each in one upload under its
        fixed key. A day without rows has no file."""
        settings, now = export.settings(), clock.now()
        closed = due_until(now, settings).date()
        open_days = [key for key in context.partition_keys if DeviceDay.of(key).day >= closed]
        if open_days:
            raise Failure(
                f"{', '.join(open_days[:5])}: not closed yet; a day file is written once its day "
                f"has ended and EXPORT_LATENESS_SECONDS={settings.lateness_seconds} have passed"
            )
        days = ranges_by_device(context, DayRange.whole)
        # Each day on its own: a day file does not depend on the day before.
        work = {device: DeviceWork([[day] for day in ranges]) for device, ranges in days.items()}
        staging = Path(tempfile.mkdtemp(prefix="telemetry-daily-"))
        try:
            counts = shared_count_groups(days_closed_by(days))
            with day_files_of(
                influxdb, s3, settings, staging, StagedDayFiles, shared_counts=counts
            ) as files:
                outcomes = export_partitions(context, files, work, settings=settings, first_due=now)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        record(context, outcomes, clock.now(), DAILY_RECONCILIATION)
        staged: dict[str, StagedDay] = {
            DeviceDay(s.device_id, s.day).key: s for s in files.staged.values()
        }
        with batched_event_writes():  # a materialization per partition, in one INSERT
            yield MaterializeResult(asset_key=TELEMETRY_DAILY, value=staged)

    return telemetry_daily
