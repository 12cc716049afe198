"""The export record's version: stored with it, older records migrated on the sensor's first
tick, records this release cannot read refused by name."""

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from dagster import AssetMaterialization, DagsterInstance, MetadataValue

from export_pipeline.defs.planning import SensorCursor
from export_pipeline.engine.progress import Progress
from export_pipeline.record.keys import EXPORTED_THROUGH, TELEMETRY_EXPORT, DeviceDay
from export_pipeline.record.ledger import progress_of, record_progress
from export_pipeline.record.storage import write_values
from export_pipeline.record.versions import (
    OLDEST_RECORD_VERSION,
    RECORD_VERSION,
    VERSION_KEY,
    RecordVersionError,
    ensure_current,
    record_version,
)
from export_pipeline_tests.conftest import Stack
from export_pipeline_tests.test_sensors import T0, Fleet


@pytest.fixture
def restored(instance: DagsterInstance) -> Iterator[DagsterInstance]:
    """The shared instance, its record's version put back after the test."""
    yield instance
    write_values(instance, {VERSION_KEY: str(RECORD_VERSION)})


def no_dates(days: object) -> list[AssetMaterialization]:
    return []


def test_a_version_1_record_gives_a_device_without_progress_its_recorded_checkpoint(
    restored: DagsterInstance,
) -> None:
    """Before progress rows were kept, a device's checkpoint was its materializations'
    `exported_through`: the migration writes it as the device's progress, once."""
    instance = restored
    device = f"v1-{uuid.uuid4().hex[:8]}"
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    through = datetime(yesterday.year, yesterday.month, yesterday.day, 13, 5, tzinfo=UTC)
    instance.report_runless_asset_event(
        AssetMaterialization(
            TELEMETRY_EXPORT,
            partition=DeviceDay(device, yesterday).key,
            metadata={EXPORTED_THROUGH: MetadataValue.timestamp(through)},
        )
    )
    write_values(instance, {VERSION_KEY: "1"})
    assert progress_of(instance, [device]) == {}

    done = ensure_current(instance, devices=[device], date_events=no_dates)

    assert len(done) == RECORD_VERSION - 1 and "1 devices given a progress row" in done[0]
    assert progress_of(instance, [device]) == {device: Progress(through, yesterday, None)}
    assert record_version(instance) == RECORD_VERSION
    # Current now: the next call migrates nothing, and a newer progress stays as it is.
    newer = Progress(through + timedelta(minutes=5), yesterday, None)
    record_progress(instance, {device: newer})
    assert ensure_current(instance, devices=[device], date_events=no_dates) == []
    assert progress_of(instance, [device]) == {device: newer}


@pytest.mark.parametrize("version", [RECORD_VERSION + 1, OLDEST_RECORD_VERSION - 1])
def test_a_record_of_a_version_this_release_cannot_read_is_refused_naming_both(
    restored: DagsterInstance, version: int
) -> None:
    write_values(restored, {VERSION_KEY: str(version)})
    with pytest.raises(RecordVersionError, match=f"is version {version}; this release reads"):
        ensure_current(restored, devices=[], date_events=no_dates)
    assert record_version(restored) == version  # nothing was migrated


def test_the_sensor_migrates_on_its_first_tick_then_trusts_its_cursor(
    stack: Stack, restored: DagsterInstance
) -> None:
    """The version is read on a tick whose cursor does not hold this release's version (the
    first after an upgrade, or after the cursor was reset), and not on the ticks after it."""
    fleet = Fleet(stack, restored, DEVICE_IDS=f"v1-{uuid.uuid4().hex[:8]}")
    write_values(restored, {VERSION_KEY: "1"})
    fleet.tick(T0)
    assert record_version(restored) == RECORD_VERSION
    assert SensorCursor.of(fleet.cursor).record == RECORD_VERSION

    write_values(restored, {VERSION_KEY: "1"})  # what no release does: shows the read is skipped
    fleet.tick(T0 + timedelta(minutes=1))
    assert record_version(restored) == 1

    fleet.cursor = SensorCursor.of(fleet.cursor)._replace(record=0).text  # an earlier form
    fleet.tick(T0 + timedelta(minutes=2))
    assert record_version(restored) == RECORD_VERSION
