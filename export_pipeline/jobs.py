"""Jobs: `register_devices` (DEVICE_IDS → `devices` partitions); the batched runs the
continuous_export sensor requests, `export_due_slices` (slices as they close) and
`export_day_files` (a file per device-day once it has closed); and `sweep_late_data`, the
hourly maintenance: closed days that changed in InfluxDB, uploads cut off half-way, and slices
past EXPORT_SLICE_RETENTION_DAYS."""

import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    Config,
    DagsterInstance,
    Failure,
    MetadataValue,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)
from pydantic import Field

from export_pipeline.daily import DayFiles
from export_pipeline.export import Dataset, DeviceOutcome, DeviceWork, export_fleet
from export_pipeline.influx import shared_count_groups, shared_read_groups
from export_pipeline.internals import (
    device_day_dates,
    log_materializations,
    pool_storage_connections,
    prune_ledger,
)
from export_pipeline.layout import (
    day_file_key,
    day_files_glob,
    device_folder,
    device_root,
    devices_root,
    slice_offset_of,
)
from export_pipeline.ledger import (
    day_file_records,
    latest_checks,
    latest_metadata,
    progress_of,
    reconciled_counts,
    record_progress,
    recorded_dates,
)
from export_pipeline.metadata import (
    DAILY_RECONCILIATION,
    RECONCILIATION,
    SLICES_REMOVED,
    TELEMETRY_DAILY,
    TELEMETRY_EXPORT,
    day_files_metadata,
    late_data_evaluation,
    materialization,
    reconciliation_evaluation,
    worth_recording,
)
from export_pipeline.partitions import (
    DEVICES,
    DeviceDay,
    date_key,
    first_window_day,
    keys_before,
    registered_devices,
)
from export_pipeline.planning import (
    WorkItem,
    admit,
    closed_window,
    slices_kept_from,
    tick_seconds,
)
from export_pipeline.progress import Progress
from export_pipeline.reconciliation import late_data
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
    day_files_of,
    slices_of,
)
from export_pipeline.retries import with_retries
from export_pipeline.runs import (
    CONTINUOUS_JOB,
    DAILY,
    DAILY_JOB,
    HEARTBEAT_SECONDS,
    SLICES,
    busy_devices,
    is_dead,
    mark_process,
    runs_in_flight,
)
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import (
    NS_PER_SECOND,
    SECONDS_PER_DAY,
    DayRange,
    day_bounds_ns,
    days_closed_by,
)


@op
def add_devices(context: OpExecutionContext, export: ExportResource) -> list[str]:
    """Registers every id in DEVICE_IDS, or none of them if any is unsafe."""
    device_ids = export.settings().device_ids
    if not device_ids:
        raise Failure("DEVICE_IDS is empty: set it to the device ids to export, comma-separated")
    _, refused = admit(device_ids)
    if refused:
        raise Failure("DEVICE_IDS has unsafe ids, none were registered: " + "; ".join(refused))
    known = set(context.instance.get_dynamic_partitions(DEVICES))
    new = [device_id for device_id in device_ids if device_id not in known]
    context.instance.add_dynamic_partitions(DEVICES, new)
    context.log.info(f"registered {len(new)} new devices: {', '.join(new) or '(none)'}")
    return new


@job
def register_devices() -> None:
    add_devices()


class WorkItemConfig(Config):
    """A range of one UTC day for some devices. The sensor writes one item per range with every
    device due for it (`devices`): a run's config grows by a string per device, not by an item,
    and Dagster validates it several times a run (at 1,000 items, ~0.2 s each). `device_id`
    names one device, as written by hand."""

    devices: list[str] = Field(default_factory=list)
    device_id: str | None = None
    date: str
    start: int = 0
    end: int = 86_400
    reexport: bool = False  # a closed day exported again because its reconciliation failed

    def device_ids(self) -> list[str]:
        named = [*self.devices, *([self.device_id] if self.device_id is not None else [])]
        if not named:
            raise Failure(
                f"a work item for {self.date} [{self.start}, {self.end}) names no device: "
                "give `devices: [...]` or `device_id`"
            )
        return named


class ExportWorkConfig(Config):
    work: list[WorkItemConfig]


class SliceWorkConfig(ExportWorkConfig):
    # ISO-8601: the run reads nothing before then (`wait_for_lateness`); the sensor asks for
    # slices up to a tick before they are due.
    not_before: str = ""


def run_config_for(
    items: Sequence[WorkItem], op_name: str = "export_slices", not_before: datetime | None = None
) -> dict[str, Any]:
    """The run config of a continuous run over `items`: ExportWorkConfig's shape, as plain
    values (a Config object per item costs 70 us, 0.35 s a tick at 5,000 devices), one item per
    range with its devices in the order given."""
    ranges: dict[tuple[date, int, int, bool], list[str]] = {}
    for item in items:
        key = (item.range.day, item.range.start, item.range.end, item.reexport)
        ranges.setdefault(key, []).append(item.device_id)
    work = [
        {"devices": devices, "date": day.isoformat(), "start": start, "end": end, "reexport": again}
        for (day, start, end, again), devices in ranges.items()
    ]
    config: dict[str, Any] = {"work": work}
    if not_before is not None:
        config["not_before"] = not_before.isoformat()
    return {"ops": {op_name: {"config": config}}}


def lateness_wait(not_before: str, now: datetime, limit: int) -> float:
    """Seconds a run waits before reading: until `not_before`, at most `limit` (the sensor asks
    at most a tick ahead; a longer wait means clocks that disagree, and waiting longer would
    only add lag)."""
    if not not_before:
        return 0.0
    try:
        ready = datetime.fromisoformat(not_before)
    except ValueError as error:
        raise Failure(f"not_before={not_before!r} is not an ISO-8601 time") from error
    if ready.tzinfo is None:
        raise Failure(f"not_before={not_before!r} has no time zone: write it in UTC (+00:00)")
    return min(max((ready - now).total_seconds(), 0.0), float(limit))


def wait_for_lateness(
    context: OpExecutionContext, not_before: str, now: datetime, settings: ExportSettings
) -> None:
    """Slices asked for ahead are read once closed for EXPORT_LATENESS_SECONDS: the run's start
    overlaps the wait instead of adding to the lag, and the files are the same as later."""
    delay = lateness_wait(not_before, now, tick_seconds(settings))
    if delay > 0:
        context.log.info(f"waiting {delay:.1f} s until {not_before}, when the slices are due")
        time.sleep(delay)


def ranges_of(
    work: Sequence[WorkItemConfig],
) -> tuple[dict[str, list[DayRange]], dict[str, list[DayRange]]]:
    """Each device's due ranges, and its whole days to export again, in time order. A run's
    config names each range once with its devices, so a device that is behind (several slices
    due) is in several items, in no particular order."""
    due: dict[str, list[DayRange]] = {}
    again: dict[str, list[DayRange]] = {}
    for item in work:
        piece = DayRange(date.fromisoformat(item.date), item.start, item.end)
        for device_id in item.device_ids():
            (again if item.reexport else due).setdefault(device_id, []).append(piece)
            due.setdefault(device_id, [])
    for ranges in [*due.values(), *again.values()]:
        ranges.sort()
    return due, again


def run_exports(
    context: OpExecutionContext,
    dataset: Dataset,
    work: Mapping[str, DeviceWork],
    *,
    settings: ExportSettings,
    clock: ClockResource,
    asset_key: AssetKey | None,
    check: AssetCheckKey,
    keeps_progress: bool,
    retry: str = "what they left is requested again on the next tick",
) -> None:
    """Export the run's work. As devices finish: a materialization of `asset_key` (None: none)
    for each range worth one in the UI (`worth_recording`; every range of a dataset without
    progress), an evaluation for every day that closed, and each device's new progress; stored
    in batches, with every heartbeat and at the end. A failing device does not hold back the
    others; the run fails at the end, naming it (`retry`: what becomes of it). The heartbeat lets
    the sensor tell a slow run from a dead one."""
    mark_process(context.instance, context.run.run_id)
    failures: list[str] = []
    materializations: list[AssetMaterialization] = []
    progress: dict[str, Progress] = {}
    stored = float("-inf")  # the first device to finish is stored at once

    def store() -> None:
        nonlocal stored
        log_materializations(context, materializations)
        materializations.clear()
        if keeps_progress:
            record_progress(context.instance, progress)
        progress.clear()
        stored = time.monotonic()

    def record(outcome: DeviceOutcome) -> None:
        device_id, previous = outcome.device_id, work[outcome.device_id].progress
        for exported in outcome.exported:
            if asset_key is not None and (
                not keeps_progress or worth_recording(exported, previous, settings.interval_seconds)
            ):
                materializations.append(materialization(exported, clock.now(), asset_key))
            previous = exported.progress or previous
            if previous is not None:
                progress[device_id] = previous
        for result in outcome.reconciliations:
            # log_event records check evaluations too; its type hint is narrower.
            context.log_event(reconciliation_evaluation(result, check))  # type: ignore[arg-type]
        for error in outcome.errors:
            context.log.error(f"{device_id}: {error}")
            failures.append(f"{device_id}: {error}")
        if len(materializations) >= 1000 or time.monotonic() - stored >= 1:
            store()  # in batches: a round trip per device would cost seconds a tick

    def heartbeat(done: int) -> None:
        store()
        context.log.info(f"exporting: {done} of {len(work)} devices done")

    def on_retry(error: BaseException, delay: float) -> None:
        context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

    try:
        export_fleet(
            dataset,
            work,
            first_due=clock.now(),
            retries=settings.retries,
            concurrency=settings.concurrency,
            heartbeat_seconds=HEARTBEAT_SECONDS,
            on_outcome=record,
            on_heartbeat=heartbeat,
            on_retry=on_retry,
        )
    finally:
        store()  # what finished is kept, also when the run is stopped
    if failures:
        raise Failure(
            f"{len(failures)} errors in {len(work)} devices (the others are done); {retry}: "
            + "; ".join(failures[:20])
        )


@op
def export_slices(
    context: OpExecutionContext,
    config: SliceWorkConfig,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> None:
    """Exports the due slices of many devices, several devices at a time: each device's due
    ranges in time order from its progress, then each whole-day re-export on its own (see
    `export_device`)."""
    pool_storage_connections(context.instance)
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
            asset_key=TELEMETRY_EXPORT,
            check=RECONCILIATION,
            keeps_progress=True,
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
    settings: ExportSettings,
    clock: ClockResource,
    retry: str = "the sensor writes them again when their slices reconcile",
) -> None:
    """Writes the day files of these closed device-days, several devices at a time, each day on
    its own: read from InfluxDB, written, published in one upload, reconciled. The
    reconciliation is the ledger's record of the device-day (telemetry_daily's partitions are
    dates); a device that fails is named in the run's failure, the others are written."""
    pool_storage_connections(context.instance)
    wanted = {device_id: sorted(set(found)) for device_id, found in days.items()}
    work = {
        device_id: DeviceWork([[DayRange.whole(day)] for day in found])
        for device_id, found in wanted.items()
    }
    closing = {
        device_id: [DayRange.whole(day) for day in found] for device_id, found in wanted.items()
    }
    counts = shared_count_groups(days_closed_by(closing))
    with (
        tempfile.TemporaryDirectory(prefix="telemetry-daily-") as staging,
        day_files_of(
            influxdb, s3, settings, Path(staging), DayFiles, shared_counts=counts
        ) as files,
    ):
        run_exports(
            context,
            files,
            work,
            settings=settings,
            clock=clock,
            asset_key=None,
            check=DAILY_RECONCILIATION,
            keeps_progress=False,
            retry=retry,
        )


def date_metadata(
    instance: DagsterInstance,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
) -> dict[date, dict[str, Any]]:
    """Each date's metadata as telemetry_daily's partition: its fleet's day files, from the
    ledger (a date is written by several runs, a batch of devices each)."""
    wanted = sorted(set(dates))
    if not wanted:
        return {}  # the usual tick's case: no read, no S3 client
    fleet = registered_devices(instance, settings)
    records = day_file_records(instance, fleet, wanted)
    store = s3.store()
    return {
        day: day_files_metadata(
            day, fleet, records, store.uri(day_files_glob(s3.daily_prefix, day=day))
        )
        for day in wanted
    }


@op
def export_days(
    context: OpExecutionContext,
    config: ExportWorkConfig,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
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
    try:
        write_day_files(context, days, influxdb=influxdb, s3=s3, settings=settings, clock=clock)
    finally:
        record_dates(context, s3, settings, {day for found in days.values() for day in found})


def date_materializations(
    instance: DagsterInstance,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
) -> list[AssetMaterialization]:
    """Each date as telemetry_daily's materialization, with its fleet's day files."""
    return [
        AssetMaterialization(TELEMETRY_DAILY, partition=date_key(day), metadata=metadata)
        for day, metadata in date_metadata(instance, s3, settings, dates).items()
    ]


def record_dates(
    context: OpExecutionContext,
    s3: ExportBucketResource,
    settings: ExportSettings,
    dates: Iterable[date],
) -> None:
    for event in date_materializations(context.instance, s3, settings, dates):
        context.log_event(event)


@job(name=DAILY_JOB, executor_def=in_process_executor)
def export_day_files() -> None:
    export_days()


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
    days = [kept_from - timedelta(days=n) for n in range(7, 0, -1)]
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
    and old runs left with nothing (see `internals.prune_ledger`); the events of
    telemetry_export's device-days older than its partitions (EXPORT_PARTITION_DAYS); and
    telemetry_daily's materializations of device-days, from before its partitions were dates,
    once each of their dates is recorded. Each device's progress, and the latest
    materialization and evaluation of every partition, stay."""
    settings, now = export.settings(), clock.now()
    upgraded = [
        date.fromisoformat(day) for day in device_day_dates(context.instance, TELEMETRY_DAILY)
    ]
    recorded = recorded_dates(context.instance, TELEMETRY_DAILY, upgraded)
    record_dates(context, s3, settings, [day for day in upgraded if day not in recorded])
    before = now - timedelta(days=settings.ledger_retention_days)
    first_day = first_window_day(settings, now.date())
    pruned = prune_ledger(
        context.instance,
        asset_keys=[TELEMETRY_EXPORT, TELEMETRY_DAILY],
        before=before,
        forget_before={TELEMETRY_EXPORT: keys_before(first_day)},
        dated=[TELEMETRY_DAILY],
    )
    context.log.info(
        f"before {before.isoformat()}: removed {pruned.materializations} superseded "
        f"materializations, {pruned.evaluations} superseded evaluations, {pruned.events} run "
        f"events and {pruned.runs} runs; {pruned.forgotten} events of telemetry_export's "
        f"device-days before {first_day}, its first partition, and of telemetry_daily's "
        "device-days (its partitions are dates)"
    )


@job(executor_def=in_process_executor)
def retain_ledger() -> None:
    """Keeps Dagster's storage, the export ledger, from growing with every tick."""
    prune_ledger_events()
