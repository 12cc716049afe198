"""The datasets' partitions: devices x UTC dates for the slices (one partition is one
device-day, one S3 folder), UTC dates for the day files (one partition is the fleet's day).

Partition keys are made and read here only, with Dagster's `MultiPartitionKey`, so no other
module depends on how Dagster spells a key (`2026-02-07|device-001`: dimensions by name).
"""

from __future__ import annotations

from datetime import date

from dagster import (
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionsDefinition,
)

from export_pipeline.record.keys import DEVICES
from export_pipeline.settings import ExportSettings

devices = DynamicPartitionsDefinition(name=DEVICES)


def device_days(
    settings: ExportSettings, first_day: date | None = None
) -> MultiPartitionsDefinition:
    """UTC dates from `first_day` (EXPORT_START_DATE) to today (end_offset=1: the open day is a
    partition too, so it can be exported as it fills) x the registered devices."""
    start = first_day or settings.start_date
    dates = DailyPartitionsDefinition(start_date=start.isoformat(), timezone="UTC", end_offset=1)
    return MultiPartitionsDefinition({"date": dates, "device": devices})


def closed_dates(settings: ExportSettings) -> DailyPartitionsDefinition:
    """telemetry_daily's partitions: the UTC dates from EXPORT_START_DATE to yesterday, each the
    whole fleet's day files of that date.

    Its history is kept for ever, so a partition per device-day would grow by the fleet every
    day (1.83 M after a year at 5,000 devices: 36 s for the Partitions tab); a date grows by one.
    Each device-day's own state (written, reconciled, failed) is the ledger's reconciliation of
    it, as for the slices; a date's materialization sums up its fleet's.
    """
    return DailyPartitionsDefinition(start_date=settings.start_date.isoformat(), timezone="UTC")
