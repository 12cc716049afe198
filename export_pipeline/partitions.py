"""Devices x UTC dates: one partition is one device-day, one S3 folder."""

import os

from dagster import (
    DagsterInstance,
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionsDefinition,
)

from export_pipeline.settings import ExportSettings, parse_start_date

devices = DynamicPartitionsDefinition(name="devices")

# end_offset=1 makes today a partition too, so the open day can be exported as it fills.
dates = DailyPartitionsDefinition(
    start_date=parse_start_date(os.environ).isoformat(), timezone="UTC", end_offset=1
)

device_days = MultiPartitionsDefinition({"date": dates, "device": devices})


def registered_devices(instance: DagsterInstance, settings: ExportSettings) -> list[str]:
    """The fleet the checks and the sweep look at: DEVICE_IDS, or every registered device."""
    assert devices.name is not None
    return list(settings.device_ids) or list(instance.get_dynamic_partitions(devices.name))
