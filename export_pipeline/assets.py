"""The datasets, as Dagster assets fed by InfluxDB:

- `telemetry_export`: the slices, one file per interval of a device-day (fresh data), on
  device x date partitions;
- `telemetry_daily`: one file per closed device-day (analytics and history), on date
  partitions, each the fleet's day; downstream assets take it as an input (`day_files`);
- `influxdb_telemetry`: InfluxDB's measurement, an external asset both are read from.

A run of either asset may cover many partitions (a backfill runs as few runs, see the backfill
policies): their device-days are exported `EXPORT_CONCURRENCY` devices at a time through the one
routine, `export.export_device`, and a device-day that fails is named in the run's failure.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date, datetime

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetOut,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    DailyPartitionsDefinition,
    Failure,
    MaterializeResult,
    MultiPartitionsDefinition,
    multi_asset,
)

from export_pipeline.export import Dataset, DeviceOutcome, DeviceWork, export_fleet
from export_pipeline.influx import shared_count_groups
from export_pipeline.internals import (
    add_partition_metadata,
    batched_event_writes,
    pool_storage_connections,
)
from export_pipeline.jobs import date_metadata, write_day_files
from export_pipeline.ledger import progress_of, record_progress
from export_pipeline.metadata import (
    INFLUXDB,
    RECONCILIATION,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    materialization_metadata,
    reconciliation_evaluation,
)
from export_pipeline.partitions import DeviceDay, date_key, registered_devices
from export_pipeline.planning import closed_part, due_until, first_due
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
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
    dates: DailyPartitionsDefinition, settings: ExportSettings
) -> AssetsDefinition:
    @multi_asset(
        name=TELEMETRY_DAILY.path[-1],
        outs={
            TELEMETRY_DAILY.path[-1]: AssetOut(
                key=TELEMETRY_DAILY,
                # Loads a date's day files for downstream assets; the asset publishes them.
                io_manager_key="day_files",
                kinds={"s3", "parquet"},
                group_name="telemetry",
                description="The fleet's telemetry for one closed UTC day, one Parquet file per "
                "device: for analytics and history.",
                is_required=False,
            )
        },
        deps=[INFLUXDB],
        partitions_def=dates,
        can_subset=True,
        # A date per run: a run is the fleet's day, EXPORT_CONCURRENCY devices at a time.
        backfill_policy=BackfillPolicy.multi_run(1),
    )
    def telemetry_daily(
        context: AssetExecutionContext,
        influxdb: InfluxDBResource,
        s3: ExportBucketResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> Iterator[MaterializeResult]:
        """Writes each device's day file of each closed date, read from InfluxDB in one streamed
        query and published in one upload under its fixed key, then reconciled. A device-day
        without rows has no file. The fleet is DEVICE_IDS, or every registered device."""
        settings, now = export.settings(), clock.now()
        closed = due_until(now, settings).date()
        days = [date.fromisoformat(key) for key in context.partition_keys]
        open_days = [day.isoformat() for day in days if day >= closed]
        if open_days:
            raise Failure(
                f"{', '.join(open_days[:5])}: not closed yet; a day file is written once its day "
                f"has ended and EXPORT_LATENESS_SECONDS={settings.lateness_seconds} have passed"
            )
        fleet = registered_devices(context.instance, settings)
        if not fleet:
            raise Failure(
                "no devices to write day files for: set DEVICE_IDS, or let the continuous_export "
                "sensor register the devices InfluxDB has"
            )
        write_day_files(
            context.op_execution_context,
            dict.fromkeys(fleet, days),
            influxdb=influxdb,
            s3=s3,
            settings=settings,
            clock=clock,
            retry="materialize the dates again to retry them",
        )
        found = date_metadata(context.instance, s3, settings, days)
        add_partition_metadata(
            context, TELEMETRY_DAILY, {date_key(day): metadata for day, metadata in found.items()}
        )
        yield MaterializeResult(asset_key=TELEMETRY_DAILY)

    return telemetry_daily
