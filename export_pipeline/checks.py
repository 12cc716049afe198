"""Asset checks on `telemetry_export` besides the per-partition `reconciliation` (which the asset
and the continuous runs evaluate themselves when a device-day closes, see `assets.py`).

- `freshness`: no device is more than three intervals behind real time. The sensor evaluates it
  every tick; it can also be executed from the UI.
"""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetsDefinition,
    asset_check,
)

from export_pipeline.ledger import checkpoints
from export_pipeline.metadata import FRESHNESS, freshness_evaluation
from export_pipeline.partitions import registered_devices
from export_pipeline.resources import ClockResource, ExportResource


def build_freshness_check(telemetry_export: AssetsDefinition) -> AssetChecksDefinition:
    @asset_check(
        asset=telemetry_export,
        name=FRESHNESS.name,
        description="No device is more than three intervals behind real time.",
    )
    def telemetry_export_freshness(
        context: AssetCheckExecutionContext, export: ExportResource, clock: ClockResource
    ) -> AssetCheckResult:
        settings, now = export.settings(), clock.now()
        fleet = registered_devices(context.instance, settings)
        evaluation = freshness_evaluation(
            checkpoints(context.instance, fleet), fleet, now, settings
        )
        return AssetCheckResult(
            passed=evaluation.passed,
            metadata=evaluation.metadata,
            severity=evaluation.severity,
        )

    return telemetry_export_freshness
