"""`telemetry_export`: one device-day of telemetry, exported from InfluxDB to its S3 folder."""

from collections.abc import Iterator

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSpec,
    Failure,
    MaterializeResult,
    MultiPartitionsDefinition,
    multi_asset,
)

from export_pipeline.export import export_device
from export_pipeline.ledger import checkpoint_dates, checkpoints
from export_pipeline.metadata import (
    RECONCILIATION,
    TELEMETRY_EXPORT,
    materialization_metadata,
    reconciliation_result,
)
from export_pipeline.partitions import DeviceDay
from export_pipeline.planning import closed_part, first_due
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
    slices_of,
)


def build_telemetry_export(device_days: MultiPartitionsDefinition) -> AssetsDefinition:
    # A multi-asset only to make the check's result optional (`can_subset`): it is evaluated
    # when the materialization closes the day, not for the open day's slices so far.
    @multi_asset(
        name=TELEMETRY_EXPORT.path[-1],
        specs=[
            AssetSpec(
                TELEMETRY_EXPORT,
                partitions_def=device_days,
                kinds={"s3", "influxdb"},
                group_name="telemetry",
                description="One device's telemetry for one UTC day, one file per slice.",
            )
        ],
        check_specs=[
            AssetCheckSpec(
                RECONCILIATION.name,
                asset=TELEMETRY_EXPORT,
                partitions_def=device_days,
                description="InfluxDB's rows for the closed device-day equal the rows in S3.",
            )
        ],
        can_subset=True,
    )
    def telemetry_export(
        context: AssetExecutionContext,
        influxdb: InfluxDBResource,
        s3: ExportBucketResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> Iterator[MaterializeResult]:
        """One device's telemetry for one UTC day, one file per interval slice, in its S3 folder.

        Materializing makes the folder equal to InfluxDB's content for the day: the same slices
        get the same keys, and objects of slices without rows are deleted, so reruns never
        duplicate a row. For the current day only the slices closed for EXPORT_LATENESS_SECONDS
        are exported; the continuous_export sensor adds the rest as they close. A closed day is
        reconciled with InfluxDB (the `reconciliation` check).
        """
        device_id, day = DeviceDay.of(context.partition_key)
        settings, now = export.settings(), clock.now()
        start = first_due(now, settings)
        dates = checkpoint_dates(now, first_due=start, start_date=settings.start_date)
        checkpoint = checkpoints(context.instance, [device_id], dates).get(device_id)

        def on_retry(error: BaseException, delay: float) -> None:
            context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

        with slices_of(influxdb, s3, settings) as slices:
            outcome = export_device(
                slices,
                device_id,
                [[closed_part(day, now, settings)]],
                checkpoint=checkpoint,
                first_due=start,
                retries=settings.retries,
                on_retry=on_retry,
            )
        if not outcome.exported:
            raise outcome.errors[0]
        (exported,) = outcome.exported
        report = exported.report
        context.log.info(
            f"{device_id} {day}: {report.rows} rows in {len(report.files_written)} files, "
            f"{len(report.files_deleted)} stale files deleted, {report.folder_uri}"
        )
        checked = RECONCILIATION in context.selected_asset_check_keys
        yield MaterializeResult(
            asset_key=TELEMETRY_EXPORT,
            metadata=materialization_metadata(exported, clock.now()),
            check_results=[
                reconciliation_result(result) for result in outcome.reconciliations if checked
            ],
        )
        if outcome.errors:
            raise Failure(f"{device_id} {day}: " + "; ".join(map(str, outcome.errors)))

    return telemetry_export
