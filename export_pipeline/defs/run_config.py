"""The run config of the continuous runs, defined once: the sensor writes it, the jobs read it,
the inspection of runs in flight reads it back."""

import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from dagster import (
    Config,
    Failure,
    OpExecutionContext,
)
from pydantic import Field

from export_pipeline.defs.planning import (
    WorkItem,
    tick_seconds,
)
from export_pipeline.engine.grid import DayRange
from export_pipeline.settings import ExportSettings


class WorkItemConfig(Config):
    """A range of one UTC day for some devices. The sensor writes one item per range with every
    device due for it (`devices`): a run's config grows by a string per device, not by an item,
    and Dagster validates it several times a run (at 1,000 items, ~0.2 s each). `device_id`
    names one device, as written by hand."""

    devices: list[str] = Field(default_factory=list)
    device_id: str | None = None
    date: str
    start: int = 0
    end: int = 86_400
    reexport: bool = False  # a closed day exported again because its reconciliation failed

    def named(self) -> list[str]:
        return [*self.devices, *([self.device_id] if self.device_id is not None else [])]

    def device_ids(self) -> list[str]:
        named = self.named()
        if not named:
            raise Failure(
                f"a work item for {self.date} [{self.start}, {self.end}) names no device: "
                "give `devices: [...]` or `device_id`"
            )
        return named


class WorkConfig(Config):
    """The run config of both continuous jobs' op (`export_slices`, `export_days`), and the one
    definition of its shape: the sensor writes it (`run_config_for`), the ops read it, the
    inspection of runs in flight reads their devices back (`run_devices`), and a hand-written run
    (docs/operations.md) is checked against it."""

    work: list[WorkItemConfig]
    # ISO-8601: the run reads nothing before then (`wait_for_lateness`); the sensor asks for
    # slices up to a tick before they are due. Day files are asked for once closed: no wait.
    not_before: str = ""

    def devices(self) -> set[str]:
        return {device_id for item in self.work for device_id in item.named()}


def run_config_for(
    items: Sequence[WorkItem], op_name: str, not_before: datetime | None = None
) -> dict[str, Any]:
    """The run config of a continuous run of `op_name` over `items`: one item per range with its
    devices in the order given (the config grows by a string per device, not by an item)."""
    ranges: dict[tuple[date, int, int, bool], list[str]] = {}
    for item in items:
        key = (item.range.day, item.range.start, item.range.end, item.reexport)
        ranges.setdefault(key, []).append(item.device_id)
    config = WorkConfig(
        work=[
            WorkItemConfig(
                devices=devices, date=day.isoformat(), start=start, end=end, reexport=again
            )
            for (day, start, end, again), devices in ranges.items()
        ],
        not_before=not_before.isoformat() if not_before is not None else "",
    )
    # Every field but a hand-written item's `device_id`, and `not_before` only where it is set.
    written = config.model_dump(exclude={"work": {"__all__": {"device_id"}}})
    if not written["not_before"]:
        del written["not_before"]
    return {"ops": {op_name: {"config": written}}}


def run_devices(run_config: Mapping[str, Any]) -> set[str]:
    """The devices a continuous run (of either job) covers, from its run config; none where it
    has no work (a run of another job)."""
    found: set[str] = set()
    for op in run_config.get("ops", {}).values():
        if "work" in op.get("config", {}):
            found |= WorkConfig.model_validate(op["config"]).devices()
    return found


def lateness_wait(not_before: str, now: datetime, limit: int) -> float:
    """Seconds a run waits before reading: until `not_before`, at most `limit` (the sensor asks
    at most a tick ahead; a longer wait means clocks that disagree, and waiting longer would
    only add lag)."""
    if not not_before:
        return 0.0
    try:
        ready = datetime.fromisoformat(not_before)
    except ValueError as error:
        raise Failure(f"not_before={not_before!r} is not an ISO-8601 time") from error
    if ready.tzinfo is None:
        raise Failure(f"not_before={not_before!r} has no time zone: write it in UTC (+00:00)")
    return min(max((ready - now).total_seconds(), 0.0), float(limit))


def wait_for_lateness(
    context: OpExecutionContext, not_before: str, now: datetime, settings: ExportSettings
) -> None:
    """Slices asked for ahead are read once closed for EXPORT_LATENESS_SECONDS: the run's start
    overlaps the wait instead of adding to the lag, and the files are the same as later."""
    delay = lateness_wait(not_before, now, tick_seconds(settings))
    if delay > 0:
        context.log.info(f"waiting {delay:.1f} s until {not_before}, when the slices are due")
        time.sleep(delay)


def ranges_of(
    work: Sequence[WorkItemConfig],
) -> tuple[dict[str, list[DayRange]], dict[str, list[DayRange]]]:
    """Each device's due ranges, and its whole days to export again, in time order. A run's
    config names each range once with its devices, so a device that is behind (several slices
    due) is in several items, in no particular order."""
    due: dict[str, list[DayRange]] = {}
    again: dict[str, list[DayRange]] = {}
    for item in work:
        piece = DayRange(date.fromisoformat(item.date), item.start, item.end)
        for device_id in item.device_ids():
            (again if item.reexport else due).setdefault(device_id, []).append(piece)
            due.setdefault(device_id, [])
    for ranges in [*due.values(), *again.values()]:
        ranges.sort()
    return due, again
