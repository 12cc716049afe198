"""Devices x UTC dates: one partition is one device-day, one S3 folder."""

import os

from dagster import (
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionsDefinition,
)

from export_pipeline.settings import parse_start_date

devices = DynamicPartitionsDefinition(name="devices")

# end_offset=1 makes today a partition too, so the open day can be exported as it fills.
dates = DailyPartitionsDefinition(
    start_date=parse_start_date(os.environ).isoformat(), timezone="UTC", end_offset=1
)

device_days = MultiPartitionsDefinition({"date": dates, "device": devices})
