"""What a continuous-export tick should do: pure functions of now, the settings, a snapshot of the
ledger and the runs in flight. The sensor (`sensors.py`) only reads that snapshot and acts on the
plan.

A device's checkpoint (`exported_through`) is the end of the last slice whose objects are complete
in S3. Everything from there to the last slice closed for EXPORT_LATENESS_SECONDS is due, cut at
UTC midnights so each piece belongs to one device-day partition.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import NamedTuple

from dagster import AssetCheckEvaluation

from export_pipeline.engine.grid import (
    SECONDS_PER_DAY,
    DayRange,
    align_down,
    closed_until,
    day_ranges,
    day_start,
)
from export_pipeline.engine.layout import DeviceIdError, shown_id, validate_device_id
from export_pipeline.engine.progress import Progress
from export_pipeline.record.events import (
    freshness_evaluation,
    reconciled_evaluation,
    summary_digest,
)
from export_pipeline.record.keys import DAILY_RECONCILED, RECONCILED, DeviceDay
from export_pipeline.record.ledger import checkpoint_dates
from export_pipeline.record.storage import CheckPartition
from export_pipeline.settings import ExportSettings


@dataclass(frozen=True, order=True)
class WorkItem:
    device_id: str
    range: DayRange
    reexport: bool = False  # a closed day whose reconciliation failed, exported whole again

    @property
    def partition_key(self) -> str:
        return DeviceDay(self.device_id, self.range.day).key


TICK_SECONDS = 10


def tick_seconds(settings: ExportSettings) -> int:
    """How often the sensor ticks, and so how far ahead it asks for slices: more often than a
    slice, so that a slice is asked for within seconds of being due."""
    return min(settings.interval_seconds, TICK_SECONDS)


def ready_at(items: Iterable[WorkItem], settings: ExportSettings) -> datetime:
    """When every range of `items` is closed for EXPORT_LATENESS_SECONDS: a run asked for ahead
    of it waits until then before reading (`jobs.wait_for_lateness`)."""
    end = max(item.range.end_time for item in items)
    return end + timedelta(seconds=settings.lateness_seconds)


def due_until(now: datetime, settings: ExportSettings) -> datetime:
    """The end of the last slice closed for EXPORT_LATENESS_SECONDS: what is due is before it."""
    return closed_until(
        now, interval_seconds=settings.interval_seconds, lateness_seconds=settings.lateness_seconds
    )


def first_due(now: datetime, settings: ExportSettings) -> datetime:
    """Where a device never exported starts: LOOKBACK_HOURS ago, not before EXPORT_START_DATE."""
    lookback = align_down(now - timedelta(hours=settings.lookback_hours), settings.interval_seconds)
    return max(lookback, day_start(settings.start_date))


def resume_point(
    checkpoint: datetime | None, *, now: datetime, settings: ExportSettings
) -> datetime:
    """Where a device's due slices start: its checkpoint's slice, or `first_due`.

    Aligned down: after a change of EXPORT_INTERVAL_SECONDS, the slice holding the old checkpoint
    is exported again in the new size (its old objects are deleted as stale).
    """
    if checkpoint is None:
        return first_due(now, settings)
    return align_down(checkpoint, settings.interval_seconds)


def due_work(
    devices: Iterable[str],
    checkpoints: Mapping[str, datetime],
    now: datetime,
    settings: ExportSettings,
) -> list[WorkItem]:
    until = due_until(now, settings)
    items: list[WorkItem] = []
    for device_id in devices:
        start = resume_point(checkpoints.get(device_id), now=now, settings=settings)
        items.extend(WorkItem(device_id, piece) for piece in day_ranges(start=start, end=until))
    return items


def devices_per_run(devices: int, settings: ExportSettings, run_slots: int | None) -> int:
    """EXPORT_DEVICES_PER_RUN, or more where a tick's devices would otherwise take more runs
    than `run_slots` (`runs.run_slots`): a run beyond the queue's limit waits a whole run, and
    every run pays its start (~2.5 s of CPU)."""
    if not run_slots:
        return settings.devices_per_run
    return max(settings.devices_per_run, -(-devices // run_slots))


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


def admit(candidates: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The candidate ids that are safe partition keys and S3 path segments, and a reason for
    each one skipped."""
    fleet, skipped = [], {}
    for device_id in candidates:
        try:
            fleet.append(validate_device_id(device_id))
        except DeviceIdError as error:
            skipped[device_id] = f"skipped: {error}"
    return fleet, skipped


@dataclass(frozen=True)
class Discovered:
    """What one tick's discovery admits: every registered device it saw, and the new ones
    within discovery's bounds; the ids refused (id to reason); the new devices left for later
    ticks (EXPORT_NEW_DEVICES_PER_TICK) and those beyond EXPORT_MAX_DEVICES."""

    fleet: list[str]
    refused: dict[str, str]
    waiting: int = 0
    over_cap: int = 0

    def warnings(self, settings: ExportSettings) -> list[str]:
        found = []
        if self.over_cap:
            found.append(
                f"{self.over_cap:,} new devices seen are beyond "
                f"EXPORT_MAX_DEVICES={settings.max_devices:,} and are not exported"
            )
        if self.waiting:
            found.append(
                f"{self.waiting:,} new devices wait for the next ticks "
                f"(EXPORT_NEW_DEVICES_PER_TICK={settings.new_devices_per_tick:,})"
            )
        return found


def discover(
    candidates: Iterable[str], known: Collection[str], settings: ExportSettings
) -> Discovered:
    """Discovery's ids bounded (DEVICE_IDS empty): safe ids matching DEVICE_ID_PATTERN, the
    registered ones always, new ones at most EXPORT_NEW_DEVICES_PER_TICK a tick (in sorted
    order) and while fewer than EXPORT_MAX_DEVICES are registered."""
    safe, skipped = admit(candidates)
    if settings.device_id_pattern:
        pattern = re.compile(settings.device_id_pattern)
        unmatched = [d for d in safe if d not in known and not pattern.fullmatch(d)]
        for device_id in unmatched:
            skipped[device_id] = (
                f"skipped: device id {shown_id(device_id)} does not match DEVICE_ID_PATTERN"
            )
        safe = [d for d in safe if d not in skipped]
    new = sorted(device_id for device_id in set(safe) if device_id not in known)
    room = max(0, settings.max_devices - len(known))
    taken = new[: min(room, settings.new_devices_per_tick)]
    over_cap = max(0, len(new) - room)
    admitted = set(taken)
    fleet = [d for d in dict.fromkeys(safe) if d in known or d in admitted]
    return Discovered(fleet, skipped, len(new) - len(taken) - over_cap, over_cap)


def registered(fleet: Iterable[str], known: Iterable[str], settings: ExportSettings) -> set[str]:
    """Whose closed days are re-exported when their reconciliation fails: DEVICE_IDS, or every
    registered device, not only those seen lately (a device that came back online may upload
    nothing but its buffer, which discovery since LOOKBACK_HOURS misses)."""
    return set(fleet) if settings.device_ids else set(known) | set(fleet)


def closed_part(day: date, now: datetime, settings: ExportSettings) -> DayRange:
    """The slices of `day` closed for the lateness allowance by `now` (all of a past day)."""
    until = due_until(now, settings)
    closed = int((until - day_start(day)).total_seconds())
    return DayRange(day, 0, max(0, min(SECONDS_PER_DAY, closed)))


def slices_kept_from(now: datetime, settings: ExportSettings) -> date:
    """The first day whose slices are kept: EXPORT_SLICE_RETENTION_DAYS before today (once a
    day file stands for the day), or every day when it is 0."""
    if not settings.slice_retention_days:
        return date.min
    return now.date() - timedelta(days=settings.slice_retention_days)


def closed_days(dates: Iterable[date], now: datetime, settings: ExportSettings) -> list[date]:
    until = due_until(now, settings)
    return [day for day in dates if day < until.date()]


def closed_window(now: datetime, settings: ExportSettings) -> list[date]:
    """The closed days the sensor, the late-data sweep and the `reconciled` checks look at: a
    week, or the lookback if longer."""
    dates = checkpoint_dates(
        now, first_due=first_due(now, settings), start_date=settings.start_date
    )
    return closed_days(dates, now, settings)


@dataclass(frozen=True)
class Snapshot:
    """What the sensor read this tick."""

    fleet: Sequence[str]  # admitted ids of DEVICE_IDS, or of the devices InfluxDB lists
    known: frozenset[str]  # registered `devices` partitions
    progress: Mapping[str, Progress]  # each device's, where it has some
    # The latest reconciliation of the slices, and of the day file (the ledger's record of it,
    # written with it), of each closed device-day in the window.
    slice_checks: Mapping[DeviceDay, CheckPartition]
    day_checks: Mapping[DeviceDay, CheckPartition]
    busy: frozenset[str]  # devices whose slices runs in flight hold
    busy_days: frozenset[str] = frozenset()  # devices whose day files runs in flight hold
    closed: Sequence[date] = ()  # the closed days of the window the checks above cover
    # The storage id of telemetry_daily's latest materialization of each of those dates.
    dates_recorded: Mapping[date, int] = field(default_factory=dict)
    run_slots: int | None = None  # most runs a tick is best split into (`runs.run_slots`)


@dataclass(frozen=True)
class TickPlan:
    new_devices: list[str]
    runs: list[list[WorkItem]]
    day_runs: list[list[WorkItem]]  # day files to write
    dates: list[date]  # dates of telemetry_daily to record (`dates_to_record`)
    until: datetime  # the end of the slices asked for (a tick ahead): runs are keyed by it
    due: datetime  # the end of the slices due now: freshness is reported once for each
    freshness: AssetCheckEvaluation
    reconciled: list[AssetCheckEvaluation]  # each dataset's summary of the window
    warnings: list[str]
    summary: str

    def cursor(self) -> SensorCursor:
        return SensorCursor(self.due.isoformat(), summary_digest(self.reconciled))


class SensorCursor(NamedTuple):
    """What the sensor last reported: the slice its freshness was for (reported once a slice,
    not every tick), a digest of the `reconciled` summaries (reported when it changes), and the
    export record's version it last found current (checked again only when this release's
    differs: the cursor is stored in the same PostgreSQL as the record, so a restored database
    brings back both, and a cursor from an older release has none)."""

    until: str
    summaries: str = ""
    record: int = 0

    @property
    def text(self) -> str:
        return f"{self.until} {self.summaries} {self.record}"

    @classmethod
    def of(cls, text: str | None) -> SensorCursor:
        until, summaries, record = [*(text or "").split(" ", 2), "", ""][:3]
        return cls(until, summaries, int(record) if record.isdigit() else 0)


def outcomes(checks: Mapping[DeviceDay, CheckPartition]) -> dict[DeviceDay, bool | None]:
    return {device_day: found.passed for device_day, found in checks.items()}


def plan_tick(
    now: datetime, settings: ExportSettings, snapshot: Snapshot, ahead: int = 0
) -> TickPlan:
    """Which devices are new, which slices and whole days to export in which runs, and what to
    remember and report.

    Slices due within `ahead` seconds (the sensor's tick) are asked for now, in runs that wait
    until they are due (`ready_at`): the run's start and the wait for the next tick overlap the
    lateness allowance instead of adding to the export's lag."""
    horizon = now + timedelta(seconds=ahead)
    fleet, busy = list(snapshot.fleet), snapshot.busy
    new = [device_id for device_id in fleet if device_id not in snapshot.known]
    done = {device_id: found.through for device_id, found in snapshot.progress.items()}
    warnings = [
        f"{device_id}: no checkpoint (never exported): exporting from LOOKBACK_HOURS ago; "
        "materialize earlier device-days to fill in"
        for device_id in sorted(set(fleet) & snapshot.known - set(done))
    ]
    late = failed_slices(snapshot, settings, now)
    warnings += [f"re-exporting {item.partition_key}: its reconciliation failed" for item in late]
    free = [device_id for device_id in fleet if device_id not in busy]
    work = with_reexports(due_work(free, done, horizon, settings), late)
    size = devices_per_run(len({item.device_id for item in work}), settings, snapshot.run_slots)
    runs = batches(work, size)
    days = due_day_files(snapshot)
    until = due_until(horizon, settings)
    return TickPlan(
        new_devices=new,
        runs=runs,
        day_runs=batches(days, settings.devices_per_run),
        dates=dates_to_record(snapshot),
        until=until,
        due=due_until(now, settings),
        freshness=freshness_evaluation(done, fleet, now, settings),
        reconciled=[
            reconciled_evaluation(RECONCILED, outcomes(snapshot.slice_checks), snapshot.closed),
            reconciled_evaluation(DAILY_RECONCILED, outcomes(snapshot.day_checks), snapshot.closed),
        ],
        warnings=warnings,
        summary=(
            f"{len(fleet)} devices ({len(new)} new, {len(busy)} busy): {len(work)} device-day "
            f"ranges due through {until.isoformat()} in {len(runs)} runs; {len(days)} day "
            "files to write"
        ),
    )


def failed_slices(snapshot: Snapshot, settings: ExportSettings, now: datetime) -> list[WorkItem]:
    """Whole-day re-exports of the closed device-days whose slices' reconciliation failed (data
    arrived after they were exported, or objects went missing), unless their device is busy or
    retention has removed the day's slices (its day file is rewritten instead)."""
    kept_from = slices_kept_from(now, settings)
    return [
        WorkItem(device_id, DayRange.whole(day), reexport=True)
        for (device_id, day), check in sorted(snapshot.slice_checks.items())
        if check.passed is False and device_id not in snapshot.busy and day >= kept_from
    ]


def dates_to_record(snapshot: Snapshot) -> list[date]:
    """The closed dates whose day files were written or judged since telemetry_daily last
    recorded them: a day-files run records its dates as it ends, so these are those of a run
    that died first (or a sweep's verdict). None while a day-files run is in flight."""
    if snapshot.busy_days:
        return []
    newest: dict[date, int] = {}
    for device_day, check in snapshot.day_checks.items():
        newest[device_day.day] = max(newest.get(device_day.day, 0), check.storage_id)
    recorded = snapshot.dates_recorded
    return sorted(day for day, storage_id in newest.items() if storage_id > recorded.get(day, 0))


def due_day_files(snapshot: Snapshot) -> list[WorkItem]:
    """The closed device-days whose day file is to be written: their slices reconciled after
    the day file was last written and reconciled (or it never was), or that reconciliation failed
    (late data found by the sweep). A device with a day-files run in flight waits."""
    due = set()
    for device_day, check in snapshot.slice_checks.items():
        day_file = snapshot.day_checks.get(device_day)
        if check.passed and check.storage_id > (day_file.storage_id if day_file else 0):
            due.add(device_day)
    for device_day, check in snapshot.day_checks.items():
        if check.passed is False:
            due.add(device_day)
    return [
        WorkItem(device_id, DayRange.whole(day))
        for device_id, day in sorted(due)
        if device_id not in snapshot.busy_days
    ]
