"""Export runs in flight: which devices of which dataset they hold, and which of them are dead.

A device is busy for a dataset while a run exporting it is queued or running: a continuous run of
the sensor, or a run of the asset (from the UI, the CLI or a backfill, one partition or a range).
A running one that has logged nothing for too long is dead: its process was killed, which the
default run launcher cannot see. Reading runs, judging them and reaping the dead are three
separate steps here, so a caller that only needs to know who is busy (the sweep) never marks a
run failed.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import (
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultRunLauncher,
    RunsFilter,
)
from dagster._check import CheckError

from export_pipeline.defs.run_config import run_devices
from export_pipeline.record.keys import DEVICES, TELEMETRY_DAILY, TELEMETRY_EXPORT, DeviceDay
from export_pipeline.record.storage import last_event_time, mark_run_failed, tag_run

SLICES, DAILY = "slices", "daily"
CONTINUOUS_JOB = "export_due_slices"
DAILY_JOB = "export_day_files"
DEVICE_TAG = "dagster/partition/device"  # on runs of one device-day of telemetry_export
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
# Every export run logs a heartbeat this often, whatever its devices do (`export_fleet`).
HEARTBEAT_SECONDS = 5.0
# A run of an asset records its partitions after its last heartbeat (thousands in one write,
# with their metadata), so it is given this many times as long as a continuous run before it is
# presumed dead.
ASSET_RUN_PATIENCE = 4
_NEVER = datetime.fromtimestamp(0, UTC)


HOST_TAG, PID_TAG = "export/host", "export/pid"  # where a run's process runs, from the run
BOOT_TAG = "export/boot"  # the boot of that host's kernel (`boot_id`)


@dataclass(frozen=True)
class RunInFlight:
    run: DagsterRun
    datasets: frozenset[str]
    devices: frozenset[str]
    asset_run: bool
    last_seen: datetime | None  # its last event, once it has started; None while queued

    @property
    def gone(self) -> bool:
        """Its process ran on this host and is no more: dead now, whatever its last event."""
        host, pid = self.run.tags.get(HOST_TAG), self.run.tags.get(PID_TAG)
        here = host == socket.gethostname() and self.run.tags.get(BOOT_TAG, "") == boot_id()
        if self.last_seen is None or not here or not (pid or "").isdigit():
            return False
        return not process_alive(int(pid or 0))


def process_alive(pid: int) -> bool:
    """A process with this id exists and is not a zombie (killed, its parent not told yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


@functools.cache
def boot_id() -> str:
    """This machine's boot, as its kernel names it: two hosts given one hostname (cloned VMs)
    still differ here, so a run on the other is never judged by this one's process table."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def mark_process(instance: DagsterInstance, run_id: str) -> None:
    """Tag the run with its process, so a sensor on the same host sees at once if it dies."""
    tag_run(
        instance,
        run_id,
        {HOST_TAG: socket.gethostname(), BOOT_TAG: boot_id(), PID_TAG: str(os.getpid())},
    )


def run_slots(instance: DagsterInstance) -> int | None:
    """How many runs a tick is best split into at most, or None for no limit: the queue's
    `max_concurrent_runs` (a run beyond it waits a whole run), and where Dagster's default
    launcher starts runs as processes on this host (the code server's, where the sensor runs),
    its cores: a run exports on about one core, and each one more costs its start."""
    slots = []
    queue = instance.get_concurrency_config().run_queue_config
    if queue is not None and queue.max_concurrent_runs > 0:
        slots.append(queue.max_concurrent_runs)
    if launches_here(instance):
        slots.append(len(os.sched_getaffinity(0)))
    return min(slots, default=None)


def launches_here(instance: DagsterInstance) -> bool:
    """Whether the instance's run launcher is Dagster's default (runs as processes of the code
    server's host), read from its configuration: building another launcher to ask may connect
    to its cluster, which the code server may have no credential for (on Kubernetes, the code
    server's pod mounts no API token, and dagster-k8s's launcher loads one when built)."""
    try:
        data = instance.get_ref().run_launcher_data
    except CheckError:  # an instance made in code (tests): its launcher is already built
        return isinstance(instance.run_launcher, DefaultRunLauncher)
    return data is None or (
        data.class_name == DefaultRunLauncher.__name__
        and data.module_name.split(".")[0] == "dagster"
    )


def range_devices(start: str, end: str, registered: Sequence[str]) -> set[str]:
    """The devices of a partition range (a rectangle: dates x devices in registration order)."""
    first, last = DeviceDay.of(start).device_id, DeviceDay.of(end).device_id
    if first not in registered or last not in registered:
        return {first, last}
    return set(registered[registered.index(first) : registered.index(last) + 1])


def datasets_of(run: DagsterRun) -> frozenset[str]:
    if run.job_name == CONTINUOUS_JOB:
        return frozenset({SLICES})
    if run.job_name == DAILY_JOB:
        return frozenset({DAILY})
    selected = run.asset_selection or frozenset()
    keys = {TELEMETRY_EXPORT: SLICES, TELEMETRY_DAILY: DAILY}
    return frozenset(dataset for key, dataset in keys.items() if key in selected)


def devices_of(run: DagsterRun, registered: Sequence[str]) -> frozenset[str]:
    if run.job_name not in (CONTINUOUS_JOB, DAILY_JOB) and datasets_of(run) == {DAILY}:
        return frozenset(registered)  # telemetry_daily's partitions are the fleet's dates
    if DEVICE_TAG in run.tags:
        return frozenset({run.tags[DEVICE_TAG]})
    if run.job_name in (CONTINUOUS_JOB, DAILY_JOB):
        return frozenset(run_devices(run.run_config))
    start, end = (run.tags.get(tag) for tag in RANGE_TAGS)
    return frozenset(range_devices(start, end, registered) if start and end else ())


def runs_in_flight(instance: DagsterInstance) -> list[RunInFlight]:
    """Queued and running export runs, with when each running one last logged."""
    registered = list(instance.get_dynamic_partitions(DEVICES))
    found = []
    for record in instance.get_run_records(RunsFilter(statuses=IN_FLIGHT)):
        run = record.dagster_run
        datasets = datasets_of(run)
        if not datasets:
            continue
        started = run.status in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
        found.append(
            RunInFlight(
                run=run,
                datasets=datasets,
                devices=devices_of(run, registered),
                asset_run=run.job_name not in (CONTINUOUS_JOB, DAILY_JOB),
                last_seen=(last_event_time(instance, run.run_id) or _NEVER) if started else None,
            )
        )
    return found


def silence_allowed(run: RunInFlight, stale_after: timedelta) -> timedelta:
    return stale_after * (ASSET_RUN_PATIENCE if run.asset_run else 1)


def is_dead(run: RunInFlight, now: datetime, stale_after: timedelta) -> bool:
    """Running, and its process gone (on this host) or silent for longer than it may be (`now`
    is the wall clock: event times are). A wrong verdict is harmless: the device's next run
    writes the same keys with the same content."""
    if run.last_seen is None:
        return False
    return run.gone or now - run.last_seen > silence_allowed(run, stale_after)


def busy_devices(runs: Iterable[RunInFlight], dataset: str = SLICES) -> set[str]:
    """The devices these runs hold for `dataset`."""
    return {device for run in runs if dataset in run.datasets for device in run.devices}


def reap_dead_runs(
    instance: DagsterInstance, dead: Iterable[RunInFlight], stale_after: timedelta
) -> None:
    """Mark dead runs failed, so their devices are exported again."""
    for run in dead:
        silence = silence_allowed(run, stale_after).total_seconds()
        why = "its process is gone" if run.gone else f"no event for over {silence:.0f} s"
        mark_run_failed(
            instance,
            run.run,
            f"Marked failed by the continuous_export sensor: {why}, its process is presumed "
            "dead. Its unexported slices are requested again.",
        )
