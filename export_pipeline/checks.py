"""Asset checks on `telemetry_export`: per device-day reconciliation, and fleet freshness.

- `reconciliation` (partitioned like the asset): InfluxDB's rows for the exported part of the
  device-day equal the rows in the folder's objects (Parquet footers), in the declared schema.
  Continuous runs evaluate it when a day closes; materializing a partition evaluates it too. The
  sensor re-exports a closed device-day whose latest evaluation failed (late data).
- `freshness`: no device is more than three intervals behind real time. The sensor evaluates it
  every tick; it can also be executed from the UI.
"""

from datetime import datetime, timedelta

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from export_pipeline.assets import device_day_of, telemetry_export
from export_pipeline.ledger import (
    CHECKED_THROUGH,
    FIELD_COUNTS,
    RECONCILIATION,
    TELEMETRY_EXPORT,
    checkpoint_dates,
    checkpoints,
    covered_through,
)
from export_pipeline.partitions import device_days, registered_devices
from export_pipeline.planning import first_due
from export_pipeline.reconciliation import LateData, Reconciliation, reconcile
from export_pipeline.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
)
from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import SECONDS_PER_DAY, day_start

FRESHNESS = AssetCheckKey(TELEMETRY_EXPORT, "freshness")
FRESHNESS_INTERVALS = 3


def reconciliation_metadata(result: Reconciliation) -> dict[str, object]:
    return {
        "influxdb_rows": result.source_rows,
        "s3_rows": result.exported_rows,
        "difference": result.exported_rows - result.source_rows,
        "files": result.files,
        "schema_mismatches": MetadataValue.json(result.schema_mismatches[:20]),
        CHECKED_THROUGH: MetadataValue.timestamp(
            day_start(result.day) + timedelta(seconds=result.through_offset)
        ),
        FIELD_COUNTS: MetadataValue.json(result.field_counts),
        "summary": result.description,
    }


def reconciliation_evaluation(result: Reconciliation) -> AssetCheckEvaluation:
    """The evaluation a continuous run records when it closes a device-day."""
    return AssetCheckEvaluation(
        asset_key=TELEMETRY_EXPORT,
        check_name=RECONCILIATION.name,
        passed=result.passed,
        metadata=reconciliation_metadata(result),  # type: ignore[arg-type]
        partition=f"{result.day.isoformat()}|{result.device_id}",
        severity=AssetCheckSeverity.ERROR,
    )


def late_data_evaluation(late: LateData) -> AssetCheckEvaluation:
    """A failed reconciliation for a device-day that changed in InfluxDB after it was
    reconciled: the continuous_export sensor exports the day again, which reconciles it anew."""
    return AssetCheckEvaluation(
        asset_key=TELEMETRY_EXPORT,
        check_name=RECONCILIATION.name,
        passed=False,
        metadata={
            "reconciled_field_counts": MetadataValue.json(late.reconciled),
            FIELD_COUNTS: MetadataValue.json(late.now),
            "summary": late.description,
        },
        partition=f"{late.day.isoformat()}|{late.device_id}",
        severity=AssetCheckSeverity.ERROR,
    )


@asset_check(
    asset=telemetry_export,
    name="reconciliation",
    partitions_def=device_days,
    description="InfluxDB's rows for the exported part of the device-day equal the rows in S3.",
)
def telemetry_export_reconciliation(
    context: AssetCheckExecutionContext,
    influxdb: InfluxDBResource,
    s3: ExportBucketResource,
    export: ExportResource,
) -> AssetCheckResult:
    device_id, day = device_day_of(context.partition_key)
    settings = export.settings()
    through = covered_through(context.instance, context.partition_key)
    offset = 0 if through is None else int((through - day_start(day)).total_seconds())
    with influxdb.source() as source:
        result = reconcile(
            source,
            s3.store(),
            s3.prefix,
            device_id,
            day,
            settings.layout,
            max(0, min(SECONDS_PER_DAY, offset)),
        )
    return AssetCheckResult(
        passed=result.passed,
        metadata=reconciliation_metadata(result),  # type: ignore[arg-type]
        severity=AssetCheckSeverity.ERROR,
    )


def lagging_devices(
    exported_through: dict[str, datetime], fleet: list[str], now: datetime, settings: ExportSettings
) -> dict[str, float]:
    """Devices more than FRESHNESS_INTERVALS intervals (plus the lateness allowance) behind."""
    allowed = FRESHNESS_INTERVALS * settings.interval_seconds + settings.lateness_seconds
    lag = {}
    for device_id in fleet:
        through = exported_through.get(device_id)
        seconds = (now - through).total_seconds() if through else float("inf")
        if seconds > allowed:
            lag[device_id] = seconds
    return lag


def freshness_evaluation(
    exported_through: dict[str, datetime], fleet: list[str], now: datetime, settings: ExportSettings
) -> AssetCheckEvaluation:
    behind = lagging_devices(exported_through, fleet, now, settings)
    lags = [(now - exported_through[d]).total_seconds() for d in fleet if d in exported_through]
    worst = sorted(behind.items(), key=lambda item: -item[1])[:20]
    return AssetCheckEvaluation(
        asset_key=TELEMETRY_EXPORT,
        check_name=FRESHNESS.name,
        passed=not behind,
        metadata={
            "devices": len(fleet),
            "devices_behind": len(behind),
            "max_export_lag_seconds": max(lags, default=0.0),
            "behind": MetadataValue.json(
                {d: (None if s == float("inf") else round(s)) for d, s in worst}
            ),
        },
        severity=AssetCheckSeverity.WARN,
    )


@asset_check(
    asset=telemetry_export,
    name="freshness",
    description="No device is more than three intervals behind real time.",
)
def telemetry_export_freshness(
    context: AssetCheckExecutionContext, export: ExportResource, clock: ClockResource
) -> AssetCheckResult:
    settings, now = export.settings(), clock.now()
    fleet = registered_devices(context.instance, settings)
    dates = checkpoint_dates(now, first_due(now, settings), settings.start_date)
    evaluation = freshness_evaluation(
        checkpoints(context.instance, fleet, dates), list(fleet), now, settings
    )
    return AssetCheckResult(
        passed=evaluation.passed,
        metadata=evaluation.metadata,
        severity=evaluation.severity,
    )
