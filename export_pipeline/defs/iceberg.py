"""The Iceberg table of closed days, wired into the runs that write day files and into the
`iceberg_maintenance` job (the table itself: `engine/table.py`).

A run that writes day files points the table away from the files it is about to write again
(`retire`), writes them, then commits each of its dates once (`commit_date`), also when a device
failed: the files written are in the table. `iceberg_maintenance` brings in any date a run could
not commit (a crash between the write and the commit), expires old snapshots and deletes the
files no retained snapshot needs.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import partial

import pyarrow as pa
from dagster import (
    DagsterInstance,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    IcebergResource,
)
from export_pipeline.defs.runs import DAILY, busy_devices, is_dead, runs_in_flight
from export_pipeline.engine.retries import with_retries
from export_pipeline.engine.store import first_line
from export_pipeline.engine.table import (
    REPLACED_FOLDER,
    CommitReport,
    DailyTable,
    Seen,
    TableError,
)
from export_pipeline.record.ledger import day_file_records, registered_devices
from export_pipeline.settings import ExportSettings

MAINTENANCE_JOB = "iceberg_maintenance"


@contextmanager
def opened_table(
    iceberg: IcebergResource,
    s3: ExportBucketResource,
    schema: pa.Schema | None,
    settings: ExportSettings,
) -> Iterator[DailyTable | None]:
    """The table for the length of a run, created with `schema` if missing (`schema` None:
    not created, `loaded` stays None); None when ICEBERG_ENABLED is false."""
    try:
        table = iceberg.daily_table(s3, connections=settings.concurrency)
    except Exception as error:
        raise TableError(
            f"the Iceberg catalog at {iceberg.shown_catalog()} cannot be used "
            f"(ICEBERG_CATALOG_URI, or CHECKPOINT_DB_* for the default): {first_line(error)}"
        ) from error
    if table is None:
        yield None
        return
    try:
        with_retries(lambda: table.load(schema), settings.retries)
    except TableError:
        raise
    except Exception as error:
        raise TableError(
            f"the Iceberg table {table.name} in the catalog at {iceberg.shown_catalog()} cannot "
            f"be opened: {first_line(error)}"
        ) from error
    try:
        yield table
    finally:
        table.close()


def retire(
    context: OpExecutionContext,
    table: DailyTable | None,
    days: Mapping[date, Sequence[str]],
    settings: ExportSettings,
) -> None:
    """Before the day files of `days` are written again: the table's copies of the files to
    be replaced (`DailyTable.retire`), one commit a date that has any; retried while S3 or the
    catalog fail transiently (a repeated retire does nothing)."""
    if table is None:
        return
    for day, devices in sorted(days.items()):
        retired = with_retries(partial(table.retire, day, devices), settings.retries)
        if retired:
            context.log.info(
                f"{table.name}: {retired} day file(s) of {day} copied aside before they are "
                "written again; the table reads the copies until the new files are committed"
            )


def commit(
    context: OpExecutionContext,
    table: DailyTable | None,
    days: Mapping[date, Sequence[str]],
    settings: ExportSettings,
    seen: Mapping[str, Seen | None] | None = None,
) -> dict[date, CommitReport]:
    """One commit a date: the table holds the date's day files of these devices as S3 has
    them (as the run's reconciliations found them: `seen`), with the date's reconciliation in
    the snapshot's summary; retried while S3 or the catalog fail transiently (a repeated
    commit changes nothing)."""
    if table is None:
        return {}
    reports = {}
    for day, devices in sorted(days.items()):
        summary = reconciliation_of(context.instance, day, devices)
        report = with_retries(
            partial(table.commit_date, day, devices, reconciliation=summary, seen=seen),
            settings.retries,
        )
        reports[day] = report
        if report.snapshot_id is not None:
            context.log.info(
                f"{table.name}: {day} committed as snapshot {report.snapshot_id} "
                f"({report.added} file(s) added, {report.removed} removed)"
            )
    return reports


def reconciliation_of(instance: DagsterInstance, day: date, devices: Sequence[str]) -> str:
    """What the ledger says of the date's device-days, as a snapshot summary property."""
    records = day_file_records(instance, devices, [day])
    passed = sum(1 for record in records.values() if record.passed)
    failed = sum(1 for record in records.values() if record.passed is False)
    return f"{passed} of {len(devices)} device-days reconciled, {failed} failed"


def commit_metadata(table: DailyTable | None, report: CommitReport | None) -> dict[str, object]:
    """The date's commit and the table's current snapshot, for the UI."""
    if table is None:
        return {}
    current = table.table.current_snapshot()
    found: dict[str, object] = {
        "iceberg_table": table.name,
        "iceberg_snapshot_id": str(current.snapshot_id) if current else "",
    }
    if report is not None:
        found["iceberg_commit"] = (
            f"snapshot {report.snapshot_id}: {report.added} added, {report.removed} removed"
            if report.snapshot_id is not None
            else "already in the table"
        )
    return found


def behind(table: DailyTable, records: Mapping[tuple[str, date], int]) -> dict[date, list[str]]:
    """The device-days the ledger says have a day file that the table does not hold as such
    (missing, or still the copy of a replaced file): a run stopped between writing and
    committing. `records`: (device, date) to the ledger's file count."""
    current: dict[tuple[str, date], str] = {}
    if table.table.current_snapshot() is not None:
        files = table.table.inspect.files().select(["file_path", "partition"]).to_pylist()
        for row in files:
            partition = row["partition"]
            day = partition["timestamp_day"]  # a date (days since the epoch in old pyiceberg)
            if isinstance(day, int):
                day = date(1970, 1, 1) + timedelta(days=day)
            current[(partition["device_id"], day)] = row["file_path"]
    missing: dict[date, list[str]] = {}
    for (device_id, day), files in sorted(records.items()):
        path = current.get((device_id, day))
        if files and (path is None or f"/{REPLACED_FOLDER}/" in path):
            missing.setdefault(day, []).append(device_id)
    return missing


@op
def maintain_table(
    context: OpExecutionContext,
    s3: ExportBucketResource,
    export: ExportResource,
    iceberg: IcebergResource,
    clock: ClockResource,
) -> None:
    """Commits any date a run left out of the table, expires snapshots older than
    ICEBERG_SNAPSHOT_RETENTION_DAYS and deletes the files no retained snapshot references."""
    settings, now = export.settings(), clock.now()
    fleet = registered_devices(context.instance, settings)
    dates = [
        settings.start_date + timedelta(days=n)
        for n in range((now.date() - settings.start_date).days)
    ]
    records = {
        (device_day.device_id, device_day.day): record.files or 0
        for device_day, record in day_file_records(context.instance, fleet, dates).items()
    }
    # None: the table is not created here; the first run that writes day files creates it.
    with opened_table(iceberg, s3, None, settings) as table:
        if table is None or table.loaded is None:
            context.log.info("no Iceberg table yet (or ICEBERG_ENABLED is false): nothing to do")
            return
        # A run writing day files now is between its `retire` and its commit: its devices are
        # its own to commit.
        wall = datetime.now(UTC)
        stale = timedelta(seconds=settings.stale_run_after)
        live = [r for r in runs_in_flight(context.instance) if not is_dead(r, wall, stale)]
        busy = busy_devices(live, DAILY)
        late = {
            day: [device for device in devices if device not in busy]
            for day, devices in behind(table, records).items()
        }
        late = {day: devices for day, devices in late.items() if devices}
        if late:
            context.log.warning(
                f"{table.name}: {sum(map(len, late.values()))} device-day(s) of "
                f"{len(late)} date(s) were written but not committed; committing them"
            )
            commit(context, table, late, settings)
        retention = timedelta(days=iceberg.snapshot_retention_days)
        report = table.maintain(now=now.astimezone(UTC), retention=retention)
        context.log.info(
            f"{table.name}: {report.expired_snapshots} snapshot(s) expired, "
            f"{len(report.deleted)} unreferenced file(s) deleted, {report.kept_young} newer "
            f"than the grace period kept"
        )


@job(name=MAINTENANCE_JOB, executor_def=in_process_executor)
def iceberg_maintenance() -> None:
    maintain_table()
