"""The continuous runs the continuous_export sensor requests: `export_due_slices`, the slices as
they close, and `export_day_files`, a file per device-day once it has closed; and the dates of
telemetry_daily they record."""

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

from dagster import (
    AssetMaterialization,
    DagsterInstance,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from export_pipeline.defs import iceberg as table_iceberg
from export_pipeline.defs.driver import run_exports
from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    IcebergResource,
    InfluxDBResource,
    day_files_of,
    slices_of,
)
from export_pipeline.defs.run_config import (
    WorkConfig,
    ranges_of,
    wait_for_lateness,
)
from export_pipeline.defs.runs import (
    CONTINUOUS_JOB,
    DAILY_JOB,
)
from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.export import DeviceWork
from export_pipeline.engine.grid import (
    NS_PER_SECOND,
    SECONDS_PER_DAY,
    DayRange,
    day_bounds_ns,
    days_closed_by,
)
from export_pipeline.engine.influx import shared_count_groups, shared_read_groups
from export_pipeline.engine.layout import (
    day_files_glob,
)
from export_pipeline.record.events import (
    day_files_metadata,
)
from export_pipeline.record.keys import (
    DAY_FILES_RECORD,
    DEVICES,
    SLICES_RECORD,
    TELEMETRY_DAILY,
    date_key,
)
from export_pipeline.record.ledger import (
    day_file_records,
    progress_of,
    registered_devices,
)
from export_pipeline.record.versions import ensure_current
from export_pipeline.settings import ExportSettings


@op
def export_slices(
    context: OpExecutionContext,
    config: WorkConfig,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """Exports the due slices of many devices, several devices at a time: each device's due
    ranges in time order from its progress, then each whole-day re-export on its own (see
    `export_device`)."""
    settings = export.settings()
    due, again = ranges_of(config.work)
    known = progress_of(context.instance, due)
    work = {
        device_id: DeviceWork(
            [ranges, *([piece] for piece in again.get(device_id, []))],
            known.get(device_id),
            # A device without progress starts where the sensor planned it, its first range.
            first_due=min(piece.start_time for piece in ranges + again.get(device_id, [])),
        )
        for device_id, ranges in due.items()
    }
    reads = shared_read_groups(single_ranges(due, again))
    counts = shared_count_groups(days_closed_by(due) + days_closed_by(again))
    with slices_of(
        influxdb, s3, settings, settings.concurrency, shared_reads=reads, shared_counts=counts
    ) as slices:
        wait_for_lateness(context, config.not_before, clock.now(), settings)
        run_exports(
            context,
            slices,
            work,
            settings=settings,
            clock=clock,
            record=SLICES_RECORD,
        )


def single_ranges(
    due: Mapping[str, Sequence[DayRange]], again: Mapping[str, Sequence[DayRange]]
) -> dict[str, tuple[int, int]]:
    """The time range, in ns, of each device due for exactly one range (the usual tick: the
    slice that just closed), for reading many such devices with one query."""
    found = {}
    for device_id, ranges in due.items():
        if len(ranges) == 1 and not again.get(device_id):
            start_ns, _ = day_bounds_ns(ranges[0].day)
            found[device_id] = (
                start_ns + ranges[0].start * NS_PER_SECOND,
                start_ns + min(ranges[0].end, SECONDS_PER_DAY) * NS_PER_SECOND,
            )
    return found


@job(name=CONTINUOUS_JOB, executor_def=in_process_executor)
def export_due_slices() -> None:
    export_slices()


def write_day_files(
    context: OpExecutionContext,
    days: Mapping[str, Iterable[date]],
    *,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    iceberg: IcebergResource,
    settings: ExportSettings,
    clock: ClockResource,
    retry: str = "the sensor writes them again when their slices reconcile",
) -> dict[date, dict[str, object]]:
    """Writes the day files of these closed device-days, several devices at a time, each day on
    its own: read from InfluxDB, written, published in one upload, reconciled. The
    reconciliation is the ledger's record of the device-day (telemetry_daily's partitions are
    dates); a device that fails is named in the run's failure, the others are written. Each
    date's files are then committed to the Iceberg table, once (`defs/iceberg.py`): what that
    gives each date's metadata is returned."""
    wanted = {device_id: sorted(set(found)) for device_id, found in days.items()}
    work = {
        device_id: DeviceWork([[DayRange.whole(day)] for day in found])
        for device_id, found in wanted.items()
    }
    closing = {
        device_id: [DayRange.whole(day) for day in found] for device_id, found in wanted.items()
    }
    by_date: dict[date, list[str]] = {}
    for device_id, found in sorted(wanted.items()):
        for day in found:
            by_date.setdefault(day, []).append(device_id)
    counts = shared_count_groups(days_closed_by(closing))
    with (
        tempfile.TemporaryDirectory(prefix="telemetry-daily-") as staging,
        day_files_of(
            influxdb, s3, settings, Path(staging), DayFiles, shared_counts=counts
        ) as files,
        table_iceberg.opened_table(iceberg, s3, files.source.columns.schema, settings) as table,
    ):
        table_iceberg.retire(context, table, by_date, settings)
        try:
            run_exports(
                context,
                files,
                work,
                settings=settings,
                clock=clock,
                record=DAY_FILES_RECORD,
                retry=retry,
            )
        except BaseException:
            # The files that were written go into the table all the same; the run fails with
            # the export's error (iceberg_maintenance commits what this could not).
            try:
                table_iceberg.commit(context, table, by_date, settings, files.seen)
            except Exception as error:
                context.log.error(f"the Iceberg table's commit failed too: {error}")
            raise
        reports = table_iceberg.commit(context, table, by_date, settings, files.seen)
        return {day: table_iceberg.commit_metadata(table, reports.get(day)) for day in by_date}


def date_metadata(
    instance: DagsterInstance,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
    tables: Mapping[date, Mapping[str, object]] | None = None,
) -> dict[date, dict[str, Any]]:
    """Each date's metadata as telemetry_daily's partition: its fleet's day files, from the
    ledger (a date is written by several runs, a batch of devices each), and the table's
    commit of the date (`tables`, from `write_day_files`)."""
    wanted = sorted(set(dates))
    if not wanted:
        return {}  # the usual tick's case: no read, no S3 client
    fleet = registered_devices(instance, settings)
    records = day_file_records(instance, fleet, wanted)
    store = s3.store()
    return {
        day: {
            **day_files_metadata(
                day, fleet, records, store.uri(day_files_glob(s3.daily_prefix, day=day))
            ),
            **(tables or {}).get(day, {}),
        }
        for day in wanted
    }


@op
def export_days(
    context: OpExecutionContext,
    config: WorkConfig,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
    iceberg: IcebergResource,
    clock: ClockResource,
) -> None:
    """Writes the day files of closed device-days (`write_day_files`), then records each of
    their dates as telemetry_daily's materialization, also when a device failed: the date's
    metadata names it, and the sensor writes it again."""
    settings = export.settings()
    days: dict[str, list[date]] = {}
    for item in config.work:
        for device_id in item.device_ids():
            days.setdefault(device_id, []).append(date.fromisoformat(item.date))
    tables: dict[date, dict[str, object]] = {}
    try:
        tables = write_day_files(
            context,
            days,
            influxdb=influxdb,
            s3=s3,
            iceberg=iceberg,
            settings=settings,
            clock=clock,
        )
    finally:
        dates = {day for found in days.values() for day in found}
        record_dates(context, s3, settings, dates, tables)


def date_materializations(
    instance: DagsterInstance,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
    tables: Mapping[date, Mapping[str, object]] | None = None,
) -> list[AssetMaterialization]:
    """Each date as telemetry_daily's materialization, with its fleet's day files."""
    return [
        AssetMaterialization(TELEMETRY_DAILY, partition=date_key(day), metadata=metadata)
        for day, metadata in date_metadata(instance, s3, settings, dates, tables).items()
    ]


def bring_record_current(
    instance: DagsterInstance, s3: ExportBucketResource, settings: ExportSettings
) -> list[str]:
    """The export record migrated to this release's version, if it is older (`versions.py`):
    what each migration did."""
    devices = sorted({*settings.device_ids, *instance.get_dynamic_partitions(DEVICES)})
    return ensure_current(
        instance,
        devices=devices,
        date_events=partial(date_materializations, instance, s3, settings),
    )


def record_dates(
    context: OpExecutionContext,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
    tables: Mapping[date, Mapping[str, object]] | None = None,
) -> None:
    for event in date_materializations(context.instance, s3, settings, dates, tables):
        context.log_event(event)


@job(name=DAILY_JOB, executor_def=in_process_executor)
def export_day_files() -> None:
    export_days()
