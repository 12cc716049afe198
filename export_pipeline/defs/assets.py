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

from collections.abc import Callable, Iterator
from datetime import date

from dagster import (
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

from export_pipeline.defs.continuous import date_metadata, write_day_files
from export_pipeline.defs.driver import run_exports
from export_pipeline.defs.planning import closed_part, due_until, first_due
from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    IcebergResource,
    InfluxDBResource,
    slices_of,
)
from export_pipeline.engine.export import DeviceWork
from export_pipeline.engine.grid import DayRange, days_closed_by
from export_pipeline.engine.influx import shared_count_groups
from export_pipeline.record.keys import (
    INFLUXDB,
    SLICES_RECORD,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    DeviceDay,
    date_key,
)
from export_pipeline.record.ledger import progress_of, registered_devices
from export_pipeline.record.storage import (
    add_partition_metadata,
)
from export_pipeline.settings import ExportSettings

influxdb_telemetry = AssetSpec(
    INFLUXDB,
    description="The InfluxDB measurement (INFLUXDB_MEASUREMENT in INFLUXDB_BUCKET) both datasets "
    "are read from; not materialized by Dagster.",
    kinds={"influxdb"},
    group_name="telemetry",
)


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
    # A multi-asset: its partitions are materialized by the run driver as devices finish, each
    # with its own metadata, so a device that fails does not hold back the others' records.
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
                # Its partitions are materialized as their devices finish (`run_exports`), not
                # by an output at the end.
                skippable=True,
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
        work = {
            device: DeviceWork([ranges], known.get(device), first_due=start)
            for device, ranges in days.items()
        }
        counts = shared_count_groups(days_closed_by(days))
        with slices_of(
            influxdb, s3, settings, settings.concurrency, shared_counts=counts
        ) as slices:
            run_exports(
                context.op_execution_context,
                slices,
                work,
                record=SLICES_RECORD,
                settings=settings,
                clock=clock,
                every_range=True,
                retry="materialize them again to retry them",
            )
        # No output: the partitions were materialized as their devices finished.
        yield from ()

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
        iceberg: IcebergResource,
        clock: ClockResource,
    ) -> Iterator[MaterializeResult]:
        """Writes each device's day file of each closed date, read from InfluxDB in one streamed
        query and published in one upload under its fixed key, then reconciled, and each date
        committed to the Iceberg table once. A device-day without rows has no file. The fleet
        is DEVICE_IDS, or every registered device."""
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
        tables = write_day_files(
            context.op_execution_context,
            dict.fromkeys(fleet, days),
            influxdb=influxdb,
            s3=s3,
            iceberg=iceberg,
            settings=settings,
            clock=clock,
            retry="materialize the dates again to retry them",
        )
        found = date_metadata(context.instance, s3, settings, days, tables)
        add_partition_metadata(
            context, TELEMETRY_DAILY, {date_key(day): metadata for day, metadata in found.items()}
        )
        yield MaterializeResult(asset_key=TELEMETRY_DAILY)

    return telemetry_daily
