"""Promises of the README that no other module holds to their word: a failing device, how many
devices run at once, the heartbeat, the late-data sweep's schedule and window, and LOG_LEVEL in
the run logs. Real services throughout; InfluxDB is slowed, where a test needs it, by a front
that holds its answers (`SlowInflux`), never replaced."""

import importlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    DailyPartitionsDefinition,
    DefaultScheduleStatus,
    Definitions,
    MultiPartitionsDefinition,
    RunsFilter,
    job,
    materialize,
    op,
)
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

from export_pipeline.defs.continuous import export_due_slices
from export_pipeline.defs.resources import ClockResource, build_resources
from export_pipeline.defs.run_config import run_devices
from export_pipeline.defs.runs import RunInFlight, is_dead
from export_pipeline.record.keys import RECONCILIATION, TELEMETRY_DAILY, TELEMETRY_EXPORT
from export_pipeline.record.ledger import checkpoints
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import Stack, telemetry_export
from export_pipeline_tests.services import wait_until
from export_pipeline_tests.test_checks import FAILED, SUCCEEDED, latest_check, summary_of
from export_pipeline_tests.test_sensors import DAY, T0, Fleet, every_10s, new_device, ns, work_of

CLOSED = datetime(2026, 2, 10, tzinfo=UTC)  # DAY is closed
READ = re.compile(r"\"device_id\"::tag = '([^']*)'")


class SlowInflux:
    """The real InfluxDB behind a front that holds every read of points (a query answered as
    CSV) until `release()`, and counts the reads in flight; other requests pass at once."""

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url
        self.changed = threading.Condition()
        self.in_flight = 0
        self.most = 0  # reads in flight at once, at most
        self.devices_read: list[str] = []
        self.released = False
        front = self

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                front.forward(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, request: BaseHTTPRequestHandler) -> None:
        accept = request.headers.get("Accept", "*/*")
        read = "csv" in accept
        if read:
            query = parse_qs(urlsplit(request.path).query).get("q", [""])[0]
            with self.changed:
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
                self.devices_read += READ.findall(query)
                self.changed.notify_all()
                self.changed.wait_for(lambda: self.released)
        try:
            answer = requests.get(
                self.target_url + request.path, headers={"Accept": accept}, timeout=300
            )
        finally:
            if read:  # answered: counted out before the client can have the answer
                with self.changed:
                    self.in_flight -= 1
                    self.changed.notify_all()
        request.send_response(answer.status_code)
        for name in ("Content-Type", "X-Influxdb-Error"):
            if name in answer.headers:
                request.send_header(name, answer.headers[name])
        request.send_header("Content-Length", str(len(answer.content)))
        request.end_headers()
        request.wfile.write(answer.content)

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def release(self) -> None:
        with self.changed:
            self.released = True
            self.changed.notify_all()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_influx(stack: Stack) -> Iterator[SlowInflux]:
    front = SlowInflux(stack.influx.url)
    yield front
    front.close()


# --- A failing device ---------------------------------------------------------------------


def test_a_failing_device_does_not_hold_back_the_others_and_the_run_fails_naming_it(
    stack: Stack, instance: DagsterInstance
) -> None:
    bad = f"a-{uuid.uuid4().hex[:8]}"  # sorts first: exported first, one device at a time
    good = [new_device(), new_device()]
    for device in good:
        stack.write(every_10s(device, T0 - timedelta(minutes=10), T0))
    # A string in a numeric field: the README's example of a device-day that cannot be exported.
    stack.write([f'telemetry,device_id={bad} temperature="hot" {ns(T0 - timedelta(minutes=5))}'])
    fleet = Fleet(stack, instance, DEVICE_IDS=",".join([bad, *good]), EXPORT_CONCURRENCY="1")
    (request,) = fleet.tick(T0 + timedelta(seconds=30)).run_requests or []
    result = export_due_slices.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        resources=fleet.resources,
        raise_on_error=False,
    )

    assert not result.success
    assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.FAILURE  # type: ignore[union-attr]
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert "1 errors in 3 devices" in message
    assert f"{bad}: InfluxDB's CSV answer could not be parsed" in message and "hot" in message
    assert not any(device in message for device in good)
    # The others were exported, recorded and are complete; the failing one wrote nothing.
    assert checkpoints(instance, [bad, *good]) == dict.fromkeys(good, T0)
    assert not any(f"device_id={bad}/" in key for key in stack.objects())
    for device in good:
        assert assert_reconciled(stack, device, [DAY], settings=fleet.settings) == 60
    # The next tick requests what is left: the failing device from the start again.
    starts = {
        device: start for device, _, start, _ in work_of(fleet.tick(T0 + timedelta(seconds=90)))
    }
    assert starts == {bad: starts[bad], **dict.fromkeys(good, 43_200)} and starts[bad] < 43_200


# --- EXPORT_CONCURRENCY -------------------------------------------------------------------


def test_export_concurrency_bounds_the_devices_exported_at_once(
    stack: Stack, instance: DagsterInstance, slow_influx: SlowInflux
) -> None:
    devices = [new_device() for _ in range(5)]
    instance.add_dynamic_partitions("devices", devices)
    for device in devices:
        stack.write(every_10s(device, T0, T0 + timedelta(minutes=10)))
    settings = stack.settings(
        INFLUXDB_URL=slow_influx.url, INFLUXDB_TIMEOUT_SECONDS="300", EXPORT_CONCURRENCY="2"
    )
    seen: dict[str, bool] = {}

    def watch() -> None:
        """Hold the first reads until two are in flight, and long enough for a third to come
        if the run allowed one (on a slow machine a third may come later: this can miss a
        breach, never invent one); then let every read through."""
        seen["two"] = slow_influx.wait_for(lambda: slow_influx.in_flight >= 2, timeout=120)
        seen["three"] = slow_influx.wait_for(lambda: slow_influx.in_flight > 2, timeout=2)
        slow_influx.release()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = materialize(  # one run over the five device-days, as a backfill or the CLI runs it
        [telemetry_export],
        tags={
            "dagster/asset_partition_range_start": f"{DAY}|{devices[0]}",
            "dagster/asset_partition_range_end": f"{DAY}|{devices[-1]}",
        },
        resources={
            **build_resources(settings),
            "clock": ClockResource(frozen_at=CLOSED.isoformat()),
        },
        instance=instance,
        raise_on_error=False,
    )
    watcher.join()
    assert result.success
    assert seen == {"two": True, "three": False}
    assert slow_influx.most == 2
    assert sorted(slow_influx.devices_read) == sorted(devices)  # each device read once
    for device in devices:
        assert assert_reconciled(stack, device, [DAY]) == 60


# --- The heartbeat and the stale time -----------------------------------------------------

# A run logs a heartbeat every 5 s (runs.HEARTBEAT_SECONDS): 12 s of silence allowed leaves a
# margin of 7 s for a loaded machine, and the device below is held for longer than that.
STALE_SECONDS = 12


def test_the_heartbeat_keeps_a_run_slower_than_the_stale_time_alive(
    stack: Stack, instance: DagsterInstance, slow_influx: SlowInflux
) -> None:
    device = new_device()
    stack.write(every_10s(device, T0 - timedelta(minutes=10), T0))
    fleet = Fleet(
        stack,
        instance,
        DEVICE_IDS=device,
        INFLUXDB_URL=slow_influx.url,
        INFLUXDB_TIMEOUT_SECONDS="300",
        EXPORT_STALE_RUN_SECONDS=str(STALE_SECONDS),
    )
    requested = fleet.tick(T0 + timedelta(seconds=30))
    outcome: dict[str, list[bool]] = {}
    running = threading.Thread(target=lambda: outcome.update(ran=fleet.run(requested)))
    running.start()
    try:
        assert slow_influx.wait_for(lambda: slow_influx.in_flight == 1, timeout=120)
        (run,) = [
            run
            for run in instance.get_runs(RunsFilter(job_name=export_due_slices.name))
            if run_devices(run.run_config) == {device}
        ]

        def events() -> tuple[float, float]:
            """When the run last logged anything, and anything but its heartbeat."""
            entries = instance.all_logs(run.run_id)
            other = [e for e in entries if "devices done" not in e.user_message]
            return entries[-1].timestamp, other[-1].timestamp

        # The one device takes longer than the stale time: the run's last event other than
        # its heartbeat grows older than EXPORT_STALE_RUN_SECONDS.
        wait_until(lambda: time.time() - events()[1] > STALE_SECONDS + 1, "silence", 120)
        last, last_but_heartbeat = events()
        silent_since = datetime.fromtimestamp(last_but_heartbeat, UTC)
        now, stale = datetime.now(UTC), timedelta(seconds=STALE_SECONDS)
        judged = RunInFlight(run, frozenset({"slices"}), frozenset({device}), False, silent_since)
        assert is_dead(judged, now, stale)  # what the sensor would say without a heartbeat
        assert last > last_but_heartbeat

        assert work_of(fleet.tick(T0 + timedelta(seconds=90))) == []  # its device is busy
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED  # type: ignore[union-attr]
    finally:
        slow_influx.release()
        running.join(timeout=300)
    assert outcome["ran"] == [True]
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS  # type: ignore[union-attr]
    audited = stack.settings(EXPORT_INTERVAL_SECONDS="60")
    assert assert_reconciled(stack, device, [DAY], settings=audited) == 60


# --- The late-data sweep ------------------------------------------------------------------


CodeLocation = Callable[..., Definitions]


@pytest.fixture
def code_location(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[CodeLocation]:
    """Loads `export_pipeline.definitions` as a code server or a run process does, from this
    stack's environment plus the given variables; the package's log level is put back after."""
    package = logging.getLogger("export_pipeline")
    level = package.level

    def load(**env: str) -> Definitions:
        for name, value in stack.env(**env).items():
            monkeypatch.setenv(name, value)
        return importlib.reload(importlib.import_module("export_pipeline.definitions")).defs

    yield load
    package.setLevel(level)


def test_the_late_data_sweep_runs_by_default_on_export_sweep_cron_in_utc(
    code_location: CodeLocation,
) -> None:
    default = code_location().get_schedule_def("late_data_sweep")
    assert default.cron_schedule == "20 * * * *"
    schedule = code_location(EXPORT_SWEEP_CRON="5 */6 * * *").get_schedule_def("late_data_sweep")
    assert schedule.cron_schedule == "5 */6 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "sweep_late_data"


def test_the_slices_partitions_are_a_window_and_the_day_files_are_dates_from_the_start(
    code_location: CodeLocation,
) -> None:
    """What keeps the Partitions tab fast at a large fleet (README, P10): telemetry_export's
    dates are the last EXPORT_PARTITION_DAYS, telemetry_daily's are the fleet's dates since
    EXPORT_START_DATE; no check is partitioned (the UI reads those one device at a time)."""
    today = datetime.now(UTC).date()
    graph = code_location(EXPORT_PARTITION_DAYS="30").get_repository_def().asset_graph

    def dates_of(graph: BaseAssetGraph, key: AssetKey) -> list[str]:
        partitions = graph.get(key).partitions_def
        assert isinstance(partitions, MultiPartitionsDefinition)
        return list(partitions.get_partitions_def_for_dimension("date").get_partition_keys())

    window = dates_of(graph, TELEMETRY_EXPORT)
    assert (window[0], window[-1]) == (str(today - timedelta(days=29)), str(today))
    # The day files' partitions are the fleet's dates, closed ones only: one a day.
    dates = graph.get(TELEMETRY_DAILY).partitions_def
    assert isinstance(dates, DailyPartitionsDefinition)
    keys = dates.get_partition_keys()
    assert (keys[0], keys[-1]) == ("2026-01-01", str(today - timedelta(days=1)))
    checks = {key.to_user_string(): graph.get(key) for key in graph.asset_check_keys}
    assert sorted(checks) == [
        "telemetry_daily:reconciled",
        "telemetry_export:freshness",
        "telemetry_export:reconciled",
    ]
    assert all(check.partitions_def is None for check in checks.values())
    # EXPORT_PARTITION_DAYS=0: every day since EXPORT_START_DATE, as before the window.
    unbounded = code_location(EXPORT_PARTITION_DAYS="0").get_repository_def().asset_graph
    assert dates_of(unbounded, TELEMETRY_EXPORT)[0] == "2026-01-01"


def test_a_day_before_the_window_is_exported_again_by_config(
    stack: Stack, instance: DagsterInstance
) -> None:
    """README, Partitions: `export_due_slices` with a whole-day item rewrites a day that is no
    longer a partition, and leaves the device's checkpoint where it was."""
    device, midnight = new_device(), datetime(2026, 2, 8, tzinfo=UTC)
    stack.write(every_10s(device, midnight - timedelta(hours=1), midnight + timedelta(minutes=5)))
    fleet = Fleet(stack, instance, DEVICE_IDS=device, LOOKBACK_HOURS="24")
    fleet.tick_and_run(midnight + timedelta(minutes=2))  # 02-07 closed, 02-08 begun
    through = checkpoints(instance, [device])[device]
    folder = f"telemetry/device_id={device}/date=2026/02/07/"
    lost = folder + "export_231000.parquet"
    stack.s3.delete_object(Bucket=stack.bucket, Key=lost)
    config = {"work": [{"device_id": device, "date": "2026-02-07", "reexport": True}]}
    resources = {**fleet.resources, "clock": ClockResource(frozen_at="2026-03-20T00:00:00+00:00")}
    assert export_due_slices.execute_in_process(
        run_config={"ops": {"export_slices": {"config": config}}},
        instance=instance,
        resources=resources,
    ).success
    stack.s3.head_object(Bucket=stack.bucket, Key=lost)  # written again
    assert assert_reconciled(stack, device, [DAY], settings=fleet.settings) == 360
    assert checkpoints(instance, [device])[device] == through


def test_late_data_older_than_the_sweeps_window_is_not_swept(
    stack: Stack, instance: DagsterInstance
) -> None:
    device, midnight = new_device(), datetime(2026, 2, 8, tzinfo=UTC)
    stack.write(every_10s(device, midnight - timedelta(hours=1), midnight))
    fleet = Fleet(stack, instance, DEVICE_IDS=device)  # LOOKBACK_HOURS=1: a week's window
    fleet.tick_and_run(midnight + timedelta(seconds=30))  # 02-07 closes and is reconciled
    partition = f"{DAY}|{device}"
    assert latest_check(instance, RECONCILIATION, partition)[0] == SUCCEEDED
    stack.write([every_10s(device, midnight - timedelta(hours=12), midnight)[0]])  # late

    # On 02-15 the window is 02-08 to 02-15: 02-07 is not looked at.
    assert fleet.sweep(datetime(2026, 2, 15, 1, tzinfo=UTC))
    assert latest_check(instance, RECONCILIATION, partition)[0] == SUCCEEDED
    # On 02-14 it starts on 02-07, the oldest day swept: the late point is found.
    assert fleet.sweep(datetime(2026, 2, 14, 1, tzinfo=UTC))
    status, evaluation = latest_check(instance, RECONCILIATION, partition)
    assert status == FAILED
    assert summary_of(evaluation) == (
        "InfluxDB changed after the day was reconciled: voltage 360 -> 361, power 360 -> 361"
    )


# --- LOG_LEVEL ----------------------------------------------------------------------------


@op
def log_at_two_levels() -> None:
    log = logging.getLogger("export_pipeline.probe")  # one of the package's loggers
    log.debug("probe at debug")
    log.info("probe at info")


@job
def log_probe() -> None:
    log_at_two_levels()


def test_log_level_sets_what_the_packages_loggers_put_in_the_run_logs(
    code_location: CodeLocation, instance: DagsterInstance
) -> None:
    """The code location is loaded with LOG_LEVEL as a run process loads it, and a run on the
    instance of the repo's dagster.yaml logs through a logger of the package (its modules log
    through Dagster's run logger today, so a probe stands in for them)."""
    logged: dict[str, list[tuple[str, str | int]]] = {}
    for level in ("DEBUG", "INFO"):
        code_location(LOG_LEVEL=level)
        result = log_probe.execute_in_process(instance=instance)
        assert result.success
        logged[level] = [
            (entry.user_message, entry.level)
            for entry in instance.all_logs(result.run_id)
            if entry.user_message.startswith("probe at") and entry.dagster_event is None
        ]
    assert logged == {
        "DEBUG": [("probe at debug", logging.DEBUG), ("probe at info", logging.INFO)],
        "INFO": [("probe at info", logging.INFO)],
    }
