"""The maintenance schedules, all running by default (UTC), so none needs an operator:
`late_data_sweep` runs `sweep_late_data` on EXPORT_SWEEP_CRON (hourly), so data arriving days
after its day was exported is found and exported again; `ledger_retention` runs `retain_ledger`
on EXPORT_RETENTION_CRON (daily), so Dagster's storage stays flat; `iceberg_table_maintenance`
runs `iceberg_maintenance` on ICEBERG_MAINTENANCE_CRON (daily), so the Iceberg table's metadata
stays small and a date a crashed run left out gets in."""

from dagster import DefaultScheduleStatus, JobDefinition, ScheduleDefinition

from export_pipeline.defs.iceberg import iceberg_maintenance
from export_pipeline.defs.maintenance import retain_ledger, sweep_late_data
from export_pipeline.settings import Settings


def running(name: str, job: JobDefinition, cron: str, description: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=description,
    )


def build_late_data_sweep(settings: Settings) -> ScheduleDefinition:
    return running(
        "late_data_sweep",
        sweep_late_data,
        settings.export.sweep_cron,
        "Marks closed device-days that changed in InfluxDB since they were reconciled; "
        "continuous_export then exports them again.",
    )


def build_ledger_retention(settings: Settings) -> ScheduleDefinition:
    return running(
        "ledger_retention",
        retain_ledger,
        settings.export.retention_cron,
        "Removes superseded events and old run logs from Dagster's storage, keeping the latest "
        "of every partition and each device's progress.",
    )


def build_iceberg_maintenance(settings: Settings) -> ScheduleDefinition:
    return running(
        "iceberg_table_maintenance",
        iceberg_maintenance,
        settings.iceberg.maintenance_cron,
        "Commits dates a run left out of the Iceberg table, expires snapshots older than "
        "ICEBERG_SNAPSHOT_RETENTION_DAYS and deletes the files no snapshot needs.",
    )
