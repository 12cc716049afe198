"""The datasets' partitions: devices x UTC dates for the slices (one partition is one
device-day, one S3 folder), UTC dates for the day files (one partition is the fleet's day).

Partition keys are made and read here only, with Dagster's `MultiPartitionKey`, so no other
module depends on how Dagster spells a key (`2026-02-07|device-001`: dimensions by name).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from types import MappingProxyType
from typing import NamedTuple

from dagster import (
    DagsterInstance,
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

from export_pipeline.settings import ExportSettings

DEVICES = "devices"
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


def date_key(day: date) -> str:
    """A date's key in `closed_dates`."""
    return day.isoformat()


def first_window_day(settings: ExportSettings, today: date) -> date:
    """The first date of telemetry_export's partitions on `today`: the last
    EXPORT_PARTITION_DAYS, not before EXPORT_START_DATE (which it is with no window).

    Partitions are devices x days, so without a window they grow by the fleet every day, and
    Dagster's UI reads them all: at 5,000 devices a year is 1.83 M partitions, and the
    Partitions tab takes 15 s to 50 s. The window keeps them to what the fleet exports now;
    an older day is exported again by config (`export_due_slices`), its day file stays a
    partition of telemetry_daily. The definition is fixed when the code location loads: the
    daemon reloads it every minute, the webserver when told to (README, Deployment).
    """
    days = settings.partition_window_days
    if not days:
        return settings.start_date
    return max(settings.start_date, today - timedelta(days=days - 1))


def keys_before(day: date) -> str:
    """A bound below which, in byte order, sort exactly the keys of the days before `day`."""
    return day.isoformat()  # keys start with their date: `2026-02-07|device-001`


# Reading a key needs only the dimensions' names, not the date range.
_KEYS = device_days(ExportSettings())


class DeviceDay(NamedTuple):
    """One partition: a device's UTC day."""

    device_id: str
    day: date

    @property
    def key(self) -> MultiPartitionKey:
        return _key(self.device_id, self.day)

    @classmethod
    def of(cls, partition_key: str) -> DeviceDay:
        keys = _KEYS.get_partition_key_from_str(partition_key).keys_by_dimension
        return cls(keys["device"], date.fromisoformat(keys["date"]))

    @classmethod
    def find(cls, partition_key: str) -> DeviceDay | None:
        """The device-day of a key of any asset: None where it is not one (a date)."""
        try:
            return cls.of(partition_key)
        except Exception:
            return None


@functools.lru_cache(maxsize=1 << 17)
def _key(device_id: str, day: date) -> MultiPartitionKey:
    """Cached: a sensor tick names every recent device-day of the fleet, and building a
    MultiPartitionKey costs ~10 µs (0.2 s a tick at 1,000 devices)."""
    return MultiPartitionKey({"date": day.isoformat(), "device": device_id})


def partition_keys(device_ids: Iterable[str], days: Iterable[date]) -> list[str]:
    """The keys of every device-day of these devices and days."""
    day_list = list(days)
    return [DeviceDay(device_id, day).key for device_id in device_ids for day in day_list]


def device_days_by_key(device_ids: Iterable[str], days: Iterable[date]) -> Mapping[str, DeviceDay]:
    """Every device-day of these devices and days, by key: what a storage answers in keys is
    read back without parsing them (~20 us a key, 2 s a tick for 5,000 devices). A tick asks
    three times for the same fleet and days, and the next tick mostly again."""
    return _device_days_by_key(tuple(device_ids), tuple(days))


@functools.lru_cache(maxsize=4)
def _device_days_by_key(
    device_ids: tuple[str, ...], days: tuple[date, ...]
) -> Mapping[str, DeviceDay]:
    found = (DeviceDay(device_id, day) for device_id in device_ids for day in days)
    return MappingProxyType({device_day.key: device_day for device_day in found})


def registered_devices(instance: DagsterInstance, settings: ExportSettings) -> list[str]:
    """The fleet the checks and the sweep look at: DEVICE_IDS, or every registered device."""
    return list(settings.device_ids) or list(instance.get_dynamic_partitions(DEVICES))
