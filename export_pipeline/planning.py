"""What a continuous-export tick should export: pure functions of devices, checkpoints and now.

A device's checkpoint (`exported_through`) is the end of the last slice whose objects are complete
in S3. Everything from there to the last slice closed for EXPORT_LATENESS_SECONDS is due, cut at
UTC midnights so each piece belongs to one device-day partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from export_pipeline.settings import ExportSettings
from export_pipeline.slicing import DayRange, align_down, closed_until, day_ranges, day_start


@dataclass(frozen=True, order=True)
class WorkItem:
    device_id: str
    range: DayRange
    reexport: bool = False  # a closed day whose reconciliation failed, exported whole again

    @property
    def partition_key(self) -> str:
        return f"{self.range.day.isoformat()}|{self.device_id}"


def first_due(now: datetime, settings: ExportSettings) -> datetime:
    """Where a device never exported starts: LOOKBACK_HOURS ago, not before EXPORT_START_DATE."""
    lookback = align_down(now - timedelta(hours=settings.lookback_hours), settings.interval_seconds)
    return max(lookback, day_start(settings.start_date))


def due_work(
    devices: Iterable[str],
    checkpoints: Mapping[str, datetime],
    now: datetime,
    settings: ExportSettings,
) -> list[WorkItem]:
    until = closed_until(now, settings.interval_seconds, settings.lateness_seconds)
    items: list[WorkItem] = []
    for device_id in devices:
        checkpoint = checkpoints.get(device_id)
        # Aligned down: after a change of EXPORT_INTERVAL_SECONDS, the slice holding the old
        # checkpoint is exported again in the new size (its old objects are deleted as stale).
        start = (
            align_down(checkpoint, settings.interval_seconds)
            if checkpoint
            else first_due(now, settings)
        )
        items.extend(WorkItem(device_id, piece) for piece in day_ranges(start, until))
    return items


def batches(items: list[WorkItem], devices_per_run: int) -> list[list[WorkItem]]:
    """Group work into runs of at most `devices_per_run` devices; a device's pieces stay together
    and in time order, so its checkpoint only ever moves forward over exported slices."""
    by_device: dict[str, list[WorkItem]] = {}
    for item in sorted(items):
        by_device.setdefault(item.device_id, []).append(item)
    groups = list(by_device.values())
    return [
        [item for group in groups[i : i + devices_per_run] for item in group]
        for i in range(0, len(groups), devices_per_run)
    ]


def with_reexports(work: list[WorkItem], failed: list[WorkItem]) -> list[WorkItem]:
    """Add whole-day re-exports (device-days whose reconciliation failed), dropping the due
    pieces they already cover."""
    whole = {(item.device_id, item.range.day) for item in failed}
    kept = [item for item in work if (item.device_id, item.range.day) not in whole]
    return kept + failed
