"""The asset checks the UI shows. Each is evaluated by the continuous_export sensor (freshness
once a slice, the summaries when they change) and can be executed from the UI.

- `freshness` (telemetry_export): no device is more than three intervals behind real time.
- `reconciled` (both datasets): no device-day closed in the last week failed its latest
  reconciliation. The reconciliations themselves are recorded per device-day under
  `reconciliation` by the runs that close a day (see `record/events.py`), not as a partitioned
  check: the UI would read those one device at a time.
"""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetsDefinition,
    asset_check,
)

from export_pipeline.defs.planning import closed_window, outcomes
from export_pipeline.defs.resources import ClockResource, ExportResource
from export_pipeline.record.events import freshness_evaluation, reconciled_evaluation
from export_pipeline.record.keys import FRESHNESS, SUMMARY_OF
from export_pipeline.record.ledger import checkpoints, latest_checks, registered_devices


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


def build_reconciled_check(
    asset: AssetsDefinition, reconciliation: AssetCheckKey
) -> AssetChecksDefinition:
    summary = SUMMARY_OF[reconciliation]

    @asset_check(
        asset=asset,
        name=summary.name,
        description="No device-day closed in the last week failed its latest reconciliation "
        "with InfluxDB (those that did are exported again, and named here until they pass).",
    )
    def reconciled(
        context: AssetCheckExecutionContext, export: ExportResource, clock: ClockResource
    ) -> AssetCheckResult:
        settings, now = export.settings(), clock.now()
        closed = closed_window(now, settings)
        fleet = registered_devices(context.instance, settings)
        latest = latest_checks(context.instance, reconciliation, fleet, closed)
        evaluation = reconciled_evaluation(summary, outcomes(latest), closed)
        return AssetCheckResult(
            passed=evaluation.passed,
            metadata=evaluation.metadata,
            severity=evaluation.severity,
            description=evaluation.description,
        )

    return reconciled
