"""The version of the export record as a whole, stored with it, and the migrations between
versions.

The record's values carry their own form (`progress.py`); what a value cannot say is what the
record lacks or holds in the wrong place. Version 1 is any record written before the version was
stored: devices exported without a progress row (their checkpoint was in their materializations),
and telemetry_daily materialized on device-days before its partitions were dates. Version 2 has
a progress row for every exported device, and telemetry_daily's materializations on dates.

The sensor brings the record to the current version on its first tick after an upgrade, before
it plans anything (and the daily retention does, if it runs first): a migration once, and no
read of the version on later ticks, since the sensor's cursor holds the version it found.
Dropping an old version is a change of `OLDEST_RECORD_VERSION` with a test: a record older than
that, or newer than this release, is refused naming both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta

from dagster import AssetMaterialization, DagsterInstance

from export_pipeline.engine.progress import Progress
from export_pipeline.record.keys import TELEMETRY_DAILY
from export_pipeline.record.ledger import (
    PROGRESS,
    record_progress,
    recorded_checkpoints,
    recorded_dates,
)
from export_pipeline.record.storage import (
    device_day_dates,
    forget_device_day_materializations,
    read_values,
    write_values,
)
from export_pipeline.settings import WEEK_DAYS

RECORD_VERSION = 2
OLDEST_RECORD_VERSION = 1
VERSION_KEY = "record/version"

# The materializations of telemetry_daily's dates, with their fleet's day files: made by the
# Dagster wiring, which knows where the day files are.
DateEvents = Callable[[Sequence[date]], Sequence[AssetMaterialization]]


class RecordVersionError(RuntimeError):
    """The stored record has a version this release cannot read or migrate."""


def record_version(instance: DagsterInstance) -> int:
    """The stored version; 1 where none is stored (a record from before versions, or none yet)."""
    found = read_values(instance, [VERSION_KEY]).get(VERSION_KEY)
    return int(found) if found else 1


def ensure_current(
    instance: DagsterInstance, *, devices: Sequence[str], date_events: DateEvents
) -> list[str]:
    """Migrate the record to RECORD_VERSION if it is older; what each migration did, for the log.

    `devices`: every device the record may hold (the registered ones and DEVICE_IDS)."""
    version = record_version(instance)
    if not OLDEST_RECORD_VERSION <= version <= RECORD_VERSION:
        newer = version > RECORD_VERSION
        raise RecordVersionError(
            f"the export record in Dagster's storage is version {version}; this release reads "
            f"versions {OLDEST_RECORD_VERSION} to {RECORD_VERSION}: "
            + (
                "a newer release wrote it, upgrade this one"
                if newer
                else "migrate it with an earlier release first"
            )
        )
    done = []
    while version < RECORD_VERSION:
        migrate = _MIGRATIONS[version - OLDEST_RECORD_VERSION]
        done.append(
            f"export record version {version} to {version + 1}: "
            + migrate(instance, devices, date_events)
        )
        version += 1
        write_values(instance, {VERSION_KEY: str(version)})
    return done


def _to_version_2(
    instance: DagsterInstance, devices: Sequence[str], date_events: DateEvents
) -> str:
    """A progress row for each device that has none, from the checkpoints its materializations
    of the last week recorded; telemetry_daily's dates recorded where only device-days were,
    then its device-day materializations removed (each device-day's state is its
    reconciliation, which stays). A run that stores progress meanwhile may be overwritten by an
    older checkpoint: its slices are then exported again under the same keys, never twice."""
    stored = read_values(instance, [PROGRESS + device for device in devices])
    missing = [device for device in devices if PROGRESS + device not in stored]
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in range(WEEK_DAYS, -1, -1)]
    found = recorded_checkpoints(instance, missing, days)
    record_progress(
        instance,
        {
            device: Progress(through, (through - timedelta(microseconds=1)).date(), None)
            for device, through in found.items()
        },
    )
    dates = [date.fromisoformat(day) for day in device_day_dates(instance, TELEMETRY_DAILY)]
    recorded = recorded_dates(instance, TELEMETRY_DAILY, dates)
    unrecorded = [day for day in dates if day not in recorded]
    for event in date_events(unrecorded):
        instance.report_runless_asset_event(event)
    forgotten = forget_device_day_materializations(instance, TELEMETRY_DAILY)
    return (
        f"{len(found)} devices given a progress row from their materializations; "
        f"{len(unrecorded)} dates of telemetry_daily recorded, {forgotten} of its device-day "
        "materializations removed"
    )


# Each migrates a record of version N (index N - OLDEST_RECORD_VERSION) to version N + 1.
_MIGRATIONS = [_to_version_2]
assert len(_MIGRATIONS) == RECORD_VERSION - OLDEST_RECORD_VERSION
