"""The code location: `dagster ... -m export_pipeline.definitions`."""

import logging
from datetime import UTC, datetime

from dagster import Definitions, in_process_executor

from export_pipeline.defs.assets import (
    build_telemetry_daily,
    build_telemetry_export,
    influxdb_telemetry,
)
from export_pipeline.defs.checks import build_freshness_check, build_reconciled_check
from export_pipeline.defs.continuous import export_day_files, export_due_slices
from export_pipeline.defs.devices import register_devices
from export_pipeline.defs.iceberg import iceberg_maintenance
from export_pipeline.defs.io_managers import with_io_managers
from export_pipeline.defs.maintenance import retain_ledger, sweep_late_data
from export_pipeline.defs.partitions import closed_dates, device_days
from export_pipeline.defs.resources import build_resources
from export_pipeline.defs.schedules import (
    build_iceberg_maintenance,
    build_late_data_sweep,
    build_ledger_retention,
)
from export_pipeline.defs.sensors import build_continuous_export
from export_pipeline.record.keys import DAILY_RECONCILIATION, RECONCILIATION, first_window_day
from export_pipeline.settings import Settings

settings = Settings.from_env()
# LOG_LEVEL governs the package's loggers in the code server and in every run process
# (dagster.yaml forwards them into Dagster's run logs).
logging.getLogger("export_pipeline").setLevel(settings.log_level)

# The slices' partitions are devices x the last EXPORT_PARTITION_DAYS (`first_window_day`); the
# day files' are dates back to EXPORT_START_DATE, each the fleet's (`closed_dates`).
today = datetime.now(UTC).date()
telemetry_export = build_telemetry_export(
    device_days(settings.export, first_window_day(settings.export, today)), settings.export
)
telemetry_daily = build_telemetry_daily(closed_dates(settings.export), settings.export)

defs = Definitions(
    assets=[
        influxdb_telemetry,
        telemetry_export,
        telemetry_daily,
    ],
    asset_checks=[
        build_freshness_check(telemetry_export),
        build_reconciled_check(telemetry_export, RECONCILIATION),
        build_reconciled_check(telemetry_daily, DAILY_RECONCILIATION),
    ],
    jobs=[
        register_devices,
        export_due_slices,
        export_day_files,
        sweep_late_data,
        retain_ledger,
        iceberg_maintenance,
    ],
    sensors=[build_continuous_export(settings)],
    schedules=[
        build_late_data_sweep(settings),
        build_ledger_retention(settings),
        build_iceberg_maintenance(settings),
    ],
    resources=with_io_managers(build_resources(settings)),
    # Every step runs in the run's own process: a second (step) process would cost ~200 MB and
    # seconds of start-up for no parallelism the export needs (it has its own thread pools).
    executor=in_process_executor,
)
