"""What the export record is filed under: the asset and check keys, the metadata names, and
the partition keys.

Partition keys are made and read here only, with Dagster's `MultiPartitionKey`, so no other
module depends on how Dagster spells a key (`2026-02-07|device-001`: dimensions by name).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from types import MappingProxyType
from typing import NamedTuple

from dagster import (
    AssetCheckKey,
    AssetKey,
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

from export_pipeline.settings import ExportSettings

INFLUXDB = AssetKey("influxdb_telemetry")
TELEMETRY_EXPORT = AssetKey("telemetry_export")
TELEMETRY_DAILY = AssetKey("telemetry_daily")
RECONCILIATION = AssetCheckKey(TELEMETRY_EXPORT, "reconciliation")
DAILY_RECONCILIATION = AssetCheckKey(TELEMETRY_DAILY, "reconciliation")
FRESHNESS = AssetCheckKey(TELEMETRY_EXPORT, "freshness")
# The checks the UI shows: every recently closed device-day of the dataset reconciled.
RECONCILED = AssetCheckKey(TELEMETRY_EXPORT, "reconciled")
DAILY_RECONCILED = AssetCheckKey(TELEMETRY_DAILY, "reconciled")
SUMMARY_OF = {RECONCILIATION: RECONCILED, DAILY_RECONCILIATION: DAILY_RECONCILED}


@dataclass(frozen=True)
class DatasetRecord:
    """How the record files one dataset's exports: the asset whose device-day partitions are
    materialized (None: its partitions are dates, and a device-day's state is its
    reconciliation), the check each closed device-day's reconciliation is an evaluation of, and
    whether each device's progress (its checkpoint) is kept."""

    asset_key: AssetKey | None
    check: AssetCheckKey
    keeps_progress: bool


SLICES_RECORD = DatasetRecord(TELEMETRY_EXPORT, RECONCILIATION, keeps_progress=True)
DAY_FILES_RECORD = DatasetRecord(None, DAILY_RECONCILIATION, keeps_progress=False)

EXPORTED_THROUGH = "exported_through"
COVERED_THROUGH = "covered_through"
FIELD_COUNTS = "influxdb_field_counts"
CHECKED_THROUGH = "checked_through"
SLICES_REMOVED = "slices_removed"  # on a device-day whose slices retention deleted


DEVICES = "devices"


def date_key(day: date) -> str:
    """A date's key in `closed_dates`."""
    return day.isoformat()


def keys_before(day: date) -> str:
    """A bound below which, in byte order, sort exactly the keys of the days before `day`."""
    return day.isoformat()  # keys start with their date: `2026-02-07|device-001`


# Reading a key needs only the dimensions' names, not the date range.
_KEYS = MultiPartitionsDefinition(
    {
        "date": DailyPartitionsDefinition(start_date="2000-01-01", timezone="UTC"),
        "device": DynamicPartitionsDefinition(name=DEVICES),
    }
)


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


def first_window_day(settings: ExportSettings, today: date) -> date:
    """The first date of telemetry_export's partitions on `today`: the last
    EXPORT_PARTITION_DAYS, not before EXPORT_START_DATE (which it is with no window).

    Partitions are devices x days, so without a window they grow by the fleet every day, and
    Dagster's UI reads them all: at 5,000 devices a year is 1.83 M partitions, and the
    Partitions tab takes 15 s to 50 s. The window keeps them to what the fleet exports now;
    an older day is exported again by config (`export_due_slices`), its day file stays a
    partition of telemetry_daily. The definition is fixed when the code location loads: the
    daemon reloads it every minute, the webserver when told to (docs/operations.md).
    """
    days = settings.partition_window_days
    if not days:
        return settings.start_date
    return max(settings.start_date, today - timedelta(days=days - 1))
