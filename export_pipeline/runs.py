"""Export runs in flight: which devices they hold, and which of them are dead.

A device is busy while a continuous-export run that covers it, or a materialization of one of its
device-days (from the UI, the CLI or a backfill), is queued or running. A running one that has
logged nothing for too long is dead: its process was killed, which the default run launcher cannot
see. Reading runs, judging them and reaping the dead are three separate steps here, so a caller
that only needs to know who is busy (the sweep) never marks a run failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from export_pipeline.internals import last_event_time, mark_run_failed

CONTINUOUS_JOB = "export_due_slices"
DEVICE_TAG = "dagster/partition/device"  # on runs materializing one device-day partition
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
# A whole-day materialization logs nothing between its start and end, so it is given this many
# times as long as a continuous run before it is presumed dead.
WHOLE_DAY_PATIENCE = 4
_NEVER = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True)
class RunInFlight:
    run: DagsterRun
    devices: frozenset[str]
    whole_day: bool
    last_seen: datetime | None  # its last event, once it has started; None while queued


def run_devices(run_config: Mapping[str, Any]) -> set[str]:
    """The devices a continuous-export run covers, from its run config."""
    work = run_config.get("ops", {}).get("export_slices", {}).get("config", {}).get("work", [])
    return {item["device_id"] for item in work}


def runs_in_flight(instance: DagsterInstance) -> list[RunInFlight]:
    """Queued and running export runs, with when each running one last logged."""
    found = []
    for record in instance.get_run_records(RunsFilter(statuses=IN_FLIGHT)):
        run = record.dagster_run
        device = run.tags.get(DEVICE_TAG)
        if device is None and run.job_name != CONTINUOUS_JOB:
            continue
        started = run.status in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
        found.append(
            RunInFlight(
                run=run,
                devices=frozenset({device} if device is not None else run_devices(run.run_config)),
                whole_day=device is not None,
                last_seen=(last_event_time(instance, run.run_id) or _NEVER) if started else None,
            )
        )
    return found


def is_dead(run: RunInFlight, now: datetime, stale_after: timedelta) -> bool:
    """Running, and silent for longer than it may be (`now` is the wall clock: event times
    are)."""
    if run.last_seen is None:
        return False
    silence = stale_after * (WHOLE_DAY_PATIENCE if run.whole_day else 1)
    return now - run.last_seen > silence


def busy_devices(runs: Iterable[RunInFlight]) -> set[str]:
    return {device for run in runs for device in run.devices}


def reap_dead_runs(
    instance: DagsterInstance, dead: Iterable[RunInFlight], stale_after: timedelta
) -> None:
    """Mark dead runs failed, so their devices are exported again."""
    for run in dead:
        silence = stale_after * (WHOLE_DAY_PATIENCE if run.whole_day else 1)
        mark_run_failed(
            instance,
            run.run,
            f"Marked failed by the continuous_export sensor: no event for over "
            f"{silence.total_seconds():.0f} s, its process is presumed dead. "
            "Its unexported slices are requested again.",
        )
