"""The maintenance schedules, both running by default (UTC): `late_data_sweep` runs
`sweep_late_data` on EXPORT_SWEEP_CRON (hourly), so data arriving days after its day was exported
is found and exported again; `ledger_retention` runs `retain_ledger` on EXPORT_RETENTION_CRON
(daily), so Dagster's storage stays flat."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from export_pipeline.defs.maintenance import retain_ledger, sweep_late_data
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


def build_ledger_retention(settings: Settings) -> ScheduleDefinition:
    """Running by default: without it the ledger grows by every tick's events for ever."""
    return ScheduleDefinition(
        name="ledger_retention",
        job=retain_ledger,
        cron_schedule=settings.export.retention_cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description="Removes superseded events and old run logs from Dagster's storage, "
        "keeping the latest of every partition and each device's progress.",
    )
