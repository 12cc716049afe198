"""`telemetry_export`: one device-day of telemetry, exported from InfluxDB to its S3 folder."""

from datetime import date, datetime, timedelta
from typing import Any

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from export_pipeline.export import ExportReport, export_device_day
from export_pipeline.ledger import COVERED_THROUGH, EXPORTED_THROUGH, checkpoint_dates, checkpoints
from export_pipeline.partitions import device_days
from export_pipeline.planning import first_due
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
)
from export_pipeline.retries import with_retries
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import SECONDS_PER_DAY, DayRange, closed_until, day_start


def device_day_of(partition_key: str) -> tuple[str, date]:
    keys = device_days.get_partition_key_from_str(partition_key).keys_by_dimension
    return keys["device"], date.fromisoformat(keys["date"])


def report_metadata(
    report: ExportReport, piece: DayRange, exported_through: datetime | None, now: datetime
) -> dict[str, Any]:
    """Materialization metadata.

    `exported_through` is the device's checkpoint after this export (the ledger the sensor
    resumes from); `covered_through` is where this device-day's exported slices end.
    """

    def stamp(value: object) -> str:
        return value.isoformat() if value else ""  # type: ignore[attr-defined]

    metadata: dict[str, Any] = {
        "dagster/row_count": report.rows,
        "dagster/uri": MetadataValue.path(report.folder_uri),
        COVERED_THROUGH: MetadataValue.timestamp(piece.end_time),
        "slices": f"{timedelta(seconds=piece.start)} to {timedelta(seconds=piece.end)} UTC",
        "files_written": len(report.files_written),
        "files_deleted": len(report.files_deleted),
        "bytes_written": report.bytes_written,
        "first_timestamp": stamp(report.first_timestamp),
        "last_timestamp": stamp(report.last_timestamp),
        "read_seconds": round(report.read_seconds, 3),
        "write_seconds": round(report.write_seconds, 3),
    }
    if exported_through is not None:
        metadata[EXPORTED_THROUGH] = MetadataValue.timestamp(exported_through)
        metadata["export_lag_seconds"] = round((now - exported_through).total_seconds(), 1)
    return metadata


def carried_checkpoint(
    checkpoint: datetime | None, piece: DayRange, now: datetime, settings: ExportSettings
) -> datetime | None:
    """The device's checkpoint after a whole-day export of `piece`.

    It advances only over contiguous coverage: materializing a later day while earlier slices
    are missing must not make the sensor skip them, and an older day never moves it back.
    """
    if checkpoint is None:
        # A device the sensor has not started yet: only a day that covers where the sensor
        # would start gives it a checkpoint, or the hours before the day would be skipped.
        start = first_due(now, settings)
        return piece.end_time if day_start(piece.day) <= start <= piece.end_time else None
    if checkpoint >= day_start(piece.day):
        return max(checkpoint, piece.end_time)
    return checkpoint


@asset(partitions_def=device_days, kinds={"s3", "influxdb"}, group_name="telemetry")
def telemetry_export(
    context: AssetExecutionContext,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
    clock: ClockResource,
) -> MaterializeResult:
    """One device's telemetry for one UTC day, one file per interval slice, in its S3 folder.

    Materializing makes the folder equal to InfluxDB's content for the day: the same slices get the
    same keys, and objects of slices without rows are deleted, so reruns never duplicate a row.
    For the current day only the slices closed for EXPORT_LATENESS_SECONDS are exported; the
    continuous_export sensor adds the rest as they close.
    """
    device_id, day = device_day_of(context.partition_key)
    settings = export.settings()
    now = clock.now()
    until = closed_until(now, settings.interval_seconds, settings.lateness_seconds)
    closed = int((until - day_start(day)).total_seconds())
    piece = DayRange(day, 0, max(0, min(SECONDS_PER_DAY, closed)))
    store = s3.store()
    with influxdb.source() as source:
        source.check()
        store.check()

        def attempt() -> ExportReport:
            return export_device_day(
                source, store, s3.prefix, device_id, day, settings, piece.start, piece.end
            )

        def on_retry(error: BaseException, delay: float) -> None:
            context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

        report = with_retries(attempt, settings.retries, on_retry)
    dates = checkpoint_dates(now, first_due(now, settings), settings.start_date)
    checkpoint = checkpoints(context.instance, [device_id], dates).get(device_id)
    through = carried_checkpoint(checkpoint, piece, now, settings)
    context.log.info(
        f"{device_id} {day}: {report.rows} rows in {len(report.files_written)} files, "
        f"{len(report.files_deleted)} stale files deleted, {report.folder_uri}"
    )
    return MaterializeResult(metadata=report_metadata(report, piece, through, clock.now()))
