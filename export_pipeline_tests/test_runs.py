"""Which runs in flight hold which devices, and which are dead: pure rules on what was read."""

from datetime import UTC, datetime, timedelta

from dagster import DagsterRun

from export_pipeline.runs import RunInFlight, busy_devices, is_dead, run_devices

NOW = datetime(2026, 2, 7, 12, tzinfo=UTC)
STALE = timedelta(seconds=180)


def in_flight(*devices: str, last_seen: datetime | None, whole_day: bool = False) -> RunInFlight:
    run = DagsterRun(job_name="export_due_slices")
    return RunInFlight(run, frozenset({"slices"}), frozenset(devices), whole_day, last_seen)


def test_a_queued_run_is_never_dead() -> None:
    assert not is_dead(in_flight("D1", last_seen=None), NOW, STALE)


def test_a_running_run_silent_for_longer_than_the_stale_time_is_dead() -> None:
    assert not is_dead(in_flight("D1", last_seen=NOW - STALE), NOW, STALE)
    assert is_dead(in_flight("D1", last_seen=NOW - STALE - timedelta(seconds=1)), NOW, STALE)


def test_a_whole_day_materialization_is_given_four_times_as_long() -> None:
    quiet = NOW - 3 * STALE
    assert not is_dead(in_flight("D1", last_seen=quiet, whole_day=True), NOW, STALE)
    assert is_dead(in_flight("D1", last_seen=NOW - 5 * STALE, whole_day=True), NOW, STALE)


def test_busy_devices_are_those_of_every_run_given() -> None:
    runs = [in_flight("D1", "D2", last_seen=None), in_flight("D3", last_seen=NOW)]
    assert busy_devices(runs) == {"D1", "D2", "D3"}


def test_a_continuous_runs_devices_come_from_its_run_config() -> None:
    config = {
        "ops": {"export_slices": {"config": {"work": [{"device_id": "a"}, {"device_id": "b"}]}}}
    }
    assert run_devices(config) == {"a", "b"}
    assert run_devices({}) == set()
