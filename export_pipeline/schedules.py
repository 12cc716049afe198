"""`late_data_sweep`: runs `sweep_late_data` on EXPORT_SWEEP_CRON (UTC; hourly by default), so
data arriving days after its day was exported is found and exported again."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from export_pipeline.jobs import sweep_late_data
from export_pipeline.settings import Settings


def build_late_data_sweep(settings: Settings) -> ScheduleDefinition:
    """Running by default, like the sensor, so late data needs no operator."""
    return ScheduleDefinition(
        name="late_data_sweep",
        job=sweep_late_data,
        cron_schedule=settings.export.sweep_cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description="Marks closed device-days that changed in InfluxDB since they were "
        "reconciled; continuous_export then exports them again.",
    )
