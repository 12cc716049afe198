"""The maintenance jobs: `sweep_late_data` (hourly: closed days that changed in InfluxDB,
uploads cut off half-way, slices past EXPORT_SLICE_RETENTION_DAYS) and `retain_ledger` (daily:
what the export record no longer needs, removed from Dagster's storage)."""

from datetime import UTC, date, datetime, timedelta
from functools import partial

from dagster import (
    AssetMaterialization,
    MetadataValue,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from export_pipeline.defs.continuous import bring_record_current
from export_pipeline.defs.planning import (
    closed_window,
    slices_kept_from,
)
from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
)
from export_pipeline.defs.runs import (
    DAILY,
    SLICES,
    busy_devices,
    is_dead,
    runs_in_flight,
)
from export_pipeline.engine.grid import (
    day_bounds_ns,
)
from export_pipeline.engine.layout import (
    day_file_key,
    device_folder,
    device_root,
    slice_offset_of,
)
from export_pipeline.engine.reconciliation import late_data
from export_pipeline.engine.retries import with_retries
from export_pipeline.record.events import (
    late_data_evaluation,
)
from export_pipeline.record.keys import (
    DAILY_RECONCILIATION,
    RECONCILIATION,
    SLICES_REMOVED,
    TELEMETRY_EXPORT,
    DeviceDay,
)
from export_pipeline.record.ledger import (
    latest_checks,
    latest_metadata,
    reconciled_counts,
    registered_devices,
    retain,
)
from export_pipeline.settings import WEEK_DAYS, devices_root


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
    aborted: list[str] = []
    for prefix, dataset in ((s3.prefix, SLICES), (s3.daily_prefix, DAILY)):
        busy = [device_root(prefix, device_id=d) for d in sorted(busy_devices(live, dataset))]

        def abort(prefix: str = prefix, busy: list[str] = busy) -> list[str]:
            return s3.multipart_uploads().abort_abandoned(devices_root(prefix), wall - stale, busy)

        aborted += with_retries(abort, settings.retries)
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

    Data can arrive days late (a device that was offline uploads its buffer). Each reconciliation
    recorded InfluxDB's count of values per field; one aggregate query per closed day in the
    sensor's window counts them again for the whole fleet. A count that grew means points were
    added after the export. A day whose slices are still kept is judged by their reconciliation
    (its day file follows when they are exported again); an older one by its day file's.
    """
    settings, now, instance = export.settings(), clock.now(), context.instance
    fleet = registered_devices(instance, settings)
    closed = closed_window(now, settings)
    kept_from = slices_kept_from(now, settings)
    by_check = {
        RECONCILIATION: [day for day in closed if day >= kept_from],
        DAILY_RECONCILIATION: [day for day in closed if day < kept_from],
    }
    reconciled = {
        check: reconciled_counts(instance, check, fleet, days) for check, days in by_check.items()
    }
    days = sorted({day for counts in reconciled.values() for _, day in counts})
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
    changed = 0
    for check, counts in reconciled.items():
        for late in late_data(counts, counts_by_day):
            context.log.warning(f"{late.day} {late.device_id}: {late.description}; re-exporting")
            # log_event records check evaluations too; its type hint is narrower.
            context.log_event(late_data_evaluation(late, check))  # type: ignore[arg-type]
            changed += 1
    swept = sum(len(counts) for counts in reconciled.values())
    context.log.info(
        f"swept {swept} reconciled device-days over {len(days)} days: {changed} changed since"
    )


@op
def remove_old_slices(
    context: OpExecutionContext,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """With EXPORT_SLICE_RETENTION_DAYS=N, deletes the slices of each device-day older than N
    days whose day file exists and reconciled (never those of a day without one), and records
    it on the slices' partition, so the UI shows the day's slices gone and where the day is."""
    settings, now, instance = export.settings(), clock.now(), context.instance
    if not settings.slice_retention_days:
        context.log.info("EXPORT_SLICE_RETENTION_DAYS=0: slices are kept")
        return
    fleet = registered_devices(instance, settings)
    kept_from = slices_kept_from(now, settings)
    # Each device-day is considered for a week after it falls out of retention.
    days = [kept_from - timedelta(days=n) for n in range(WEEK_DAYS, 0, -1)]
    slices = latest_metadata(instance, TELEMETRY_EXPORT, fleet, days)
    done = {device_day for device_day, values in slices.items() if SLICES_REMOVED in values}
    daily = latest_checks(instance, DAILY_RECONCILIATION, fleet, days)
    ready = sorted(dd for dd, check in daily.items() if check.passed and dd not in done)
    store = s3.store()
    for device_id, day in ready:
        folder = device_folder(s3.prefix, device_id=device_id, day=day, layout=settings.layout)
        listed = store.list_keys(folder)
        ours = sorted(key for key in listed if slice_offset_of(key[len(folder) :]) is not None)
        with_retries(partial(store.delete, ours), settings.retries)
        day_file = store.uri(day_file_key(s3.daily_prefix, device_id=device_id, day=day))
        context.log_event(
            AssetMaterialization(
                asset_key=TELEMETRY_EXPORT,
                partition=DeviceDay(device_id, day).key,
                metadata={
                    "dagster/row_count": 0,
                    "dagster/uri": MetadataValue.path(store.uri(folder)),
                    SLICES_REMOVED: len(ours),
                    "day_file": MetadataValue.path(day_file),
                },
                description="Slices removed after EXPORT_SLICE_RETENTION_DAYS; the day is in "
                "telemetry_daily.",
            )
        )
    context.log.info(f"removed the slices of {len(ready)} device-days older than {kept_from}")


@job(executor_def=in_process_executor)
def sweep_late_data() -> None:
    """Late data, the leftovers of uploads cut off mid-way, and slices past their retention."""
    find_late_data()
    abort_abandoned_uploads()
    remove_old_slices()


@op
def prune_ledger_events(
    context: OpExecutionContext,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """Removes from Dagster's storage what nothing needs any more, older than
    EXPORT_LEDGER_RETENTION_DAYS: superseded materializations and evaluations, old run logs,
    and old runs left with nothing; and the events of telemetry_export's device-days older than
    its partitions (EXPORT_PARTITION_DAYS), see `ledger.retain`. Each device's progress, and the
    latest materialization and evaluation of every partition, stay. The record is brought to
    the current version first, if the sensor has not yet."""
    settings, now = export.settings(), clock.now()
    for note in bring_record_current(context.instance, s3, settings):
        context.log.info(note)
    pruned, first_day = retain(context.instance, settings, now)
    context.log.info(
        f"before {now - timedelta(days=settings.ledger_retention_days)}: removed "
        f"{pruned.materializations} superseded materializations, {pruned.evaluations} "
        f"superseded evaluations, {pruned.events} run events and {pruned.runs} runs; "
        f"{pruned.forgotten} events of telemetry_export's device-days before {first_day}, its "
        "first partition"
    )


@job(executor_def=in_process_executor)
def retain_ledger() -> None:
    """Keeps Dagster's storage, the export ledger, from growing with every tick."""
    prune_ledger_events()
