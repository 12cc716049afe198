"""The demo, `bash scripts/run`, started from a clean clone (of the committed HEAD) as a new user
would: SIGTERM or Ctrl-C stops every process it started within 30 s, and a second start comes up as
the first did.

The clone runs on free ports (written to its `.env`) with a Dagster database of its own, so it
meets neither the machine's demo nor other tests, and links the test run's virtual environment
(EXPORT_PIPELINE_VENV) rather than installing one. A process belongs to the demo when its working
directory or its command line is inside the clone: the demo starts everything there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from export_pipeline_tests.conftest import REPO
from export_pipeline_tests.services import drop_database, ensure_postgres, free_port, wait_until

STOP_BOUND_SECONDS = 30  # the promise
START_TIMEOUT_SECONDS = 120
INFLUXDB_DATABASE = "telemetry"
# Every kind of process the demo runs, by a piece of its command line.
PARTS = {
    "Dagster webserver": "export_pipeline.ui",
    "Dagster daemon": "dagster-daemon run",
    "Dagster code server": "export_pipeline.code_server",
    "health service": "export_pipeline.health",
    "simulator": "export_pipeline.simulate",
    "InfluxDB": "influxd -config",
    "S3 server": "weed mini",
}


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid} [{self.state()}]: {self.cmdline[:160]}"

    def state(self) -> str:
        """Its scheduler state, what it waits in, and its pending, blocked, ignored and caught
        signals: what a failure message needs to tell a stuck process from a busy one."""
        try:
            status = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                if ":" in line
            )
            wchan = Path(f"/proc/{self.pid}/wchan").read_text()
        except OSError:
            return "gone"
        fields = ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
        return " ".join(status[name].strip() for name in fields if name in status) + f" {wchan}"


def default_signals() -> None:
    """In the demo's process before it starts: no signal blocked or ignored, as in a terminal,
    whatever threads of the test run (Dagster's, the servers') did to the mask it inherits."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def live_processes() -> Iterator[tuple[Process, str]]:
    """Every process of the machine that is not a zombie, with its working directory."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            cwd = os.readlink(entry / "cwd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # it ended meanwhile
        if state != "Z":
            yield Process(int(entry.name), int(ppid), cmdline), cwd


@dataclass
class Demo:
    """A clone of the repository and the `scripts/run` started in it."""

    root: Path
    log: Path
    ports: dict[str, int]
    run: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.ports['DAGSTER_WEBSERVER_PORT']}"

    @property
    def health(self) -> str:
        return f"http://127.0.0.1:{self.ports['PORT']}"

    @property
    def influxdb(self) -> str:
        return f"http://127.0.0.1:{self.ports['INFLUXDB']}"

    def start(self) -> None:
        """`bash scripts/run` as a terminal starts it: in a process group of its own, SIGINT at
        its default (whatever the test run's), with no more than a login's environment."""
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start {self.starts}\n".encode())
            self.run = subprocess.Popen(
                ["env", "--default-signal=INT", "bash", "scripts/run"],
                cwd=self.root,
                env={
                    "PATH": os.environ["PATH"],
                    "HOME": os.environ.get("HOME", "/root"),
                    "LANG": "C.UTF-8",
                    "EXPORT_PIPELINE_VENV": sys.prefix,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=default_signals,
            )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_until_up(self) -> None:
        """The UI answers, and the health service is ready: the daemon's sensor heartbeat is
        fresh and PostgreSQL, the S3 bucket and InfluxDB answer."""

        def up() -> bool:
            assert self.run is not None
            if self.run.poll() is not None:
                raise AssertionError(
                    f"scripts/run exited ({self.run.returncode}):\n{self.log_tail()}"
                )
            ui = requests.get(f"{self.ui}/server_info", timeout=2)
            ready = requests.get(f"{self.health}/ready", timeout=5)
            return ui.status_code == 200 and ready.status_code == 200

        try:
            wait_until(up, "the demo", timeout=START_TIMEOUT_SECONDS)
        except RuntimeError as error:
            raise AssertionError(f"{error}\n{self.log_tail()}") from error

    def processes(self) -> list[Process]:
        """The live processes working in the clone or naming it."""
        inside = str(self.root)
        return [
            process
            for process, cwd in live_processes()
            if cwd == inside or cwd.startswith(inside + "/") or inside in process.cmdline
        ]

    def wait_for_a_run(self) -> None:
        """Until the code server's forkserver has a child: the process of a run the sensor
        launched."""

        def launched() -> bool:
            processes = self.processes()
            servers = {p.pid for p in processes if PARTS["Dagster code server"] in p.cmdline}
            forkservers = {
                p.pid for p in processes if p.ppid in servers and "forkserver" in p.cmdline
            }
            return any(p.ppid in forkservers for p in processes)

        try:
            # The sensor asks for a run at least every interval (60 s); one lives seconds.
            wait_until(launched, "a run of the continuous_export sensor", timeout=100)
        except RuntimeError as error:
            raise AssertionError(f"{error}\n{self.log_tail()}") from error

    def stop(self, how: signal.Signals) -> float:
        """Signal as a user does and return the seconds until no process of the demo is left
        (the bound and a little more at most). SIGINT goes to scripts/run's process group, as
        Ctrl-C in its terminal does; SIGTERM to scripts/run alone, as `kill` does."""
        assert self.run is not None
        with self.log.open("a") as log:
            log.write(f"===== {how.name} at {datetime.now(UTC):%H:%M:%S.%f}\n")
        began = time.monotonic()
        if how == signal.SIGINT:
            os.killpg(self.run.pid, signal.SIGINT)
        else:
            self.run.send_signal(how)
        while time.monotonic() - began < STOP_BOUND_SECONDS + 5:
            if self.run.poll() is not None and not self.processes():
                break
            time.sleep(0.2)
        return time.monotonic() - began

    def clean_up(self) -> None:
        """Stop what a test left running, as scripts/run does, then kill whatever survives, so
        a failing test leaks nothing."""
        if self.run is not None and self.run.poll() is None:
            self.run.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.wait(timeout=STOP_BOUND_SECONDS + 5)
        if self.run is not None and self.run.poll() is None:
            os.killpg(self.run.pid, signal.SIGKILL)
            self.run.wait(timeout=30)
        for _ in range(5):  # what is killed may have started a child meanwhile
            for process in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            time.sleep(0.2)

    def oldest_point(self) -> str:
        """The time of the oldest point in the demo's InfluxDB database."""
        answer = requests.get(
            f"{self.influxdb}/query",
            params={"db": INFLUXDB_DATABASE, "q": "SELECT first(voltage) FROM telemetry"},
            timeout=10,
        )
        answer.raise_for_status()
        return str(answer.json()["results"][0]["series"][0]["values"][0][0])


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    ensure_postgres()
    root = tmp_path / "export-pipeline"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
    ports = {
        name: free_port()
        for name in ("DAGSTER_WEBSERVER_PORT", "PORT", "INFLUXDB", "INFLUXDB_RPC", "S3")
    }
    database = f"export_pipeline_demo_{os.getpid()}"
    settings = (root / ".env.example").read_text() + (
        "\n# The demo test: free ports and a database of its own (later lines win).\n"
        f"INFLUXDB_URL=http://127.0.0.1:{ports['INFLUXDB']}\n"
        f"INFLUXDB_BUCKET={INFLUXDB_DATABASE}\n"
        "INFLUXDB_MEASUREMENT=telemetry\n"
        f"INFLUXDB_BIND_ADDRESS=127.0.0.1:{ports['INFLUXDB_RPC']}\n"
        f"S3_ENDPOINT_URL=http://127.0.0.1:{ports['S3']}\n"
        f"CHECKPOINT_DB_NAME={database}\n"
        f"PORT={ports['PORT']}\n"
        f"DAGSTER_WEBSERVER_PORT={ports['DAGSTER_WEBSERVER_PORT']}\n"
    )
    (root / ".env").write_text(settings)
    started = Demo(root, tmp_path / "demo.log", ports)
    yield started
    started.clean_up()
    drop_database(database)


def assert_every_part_runs(demo: Demo) -> None:
    """Before a stop: the scan sees each kind of process, so an empty scan after it means
    something."""
    running = demo.processes()
    missing = [name for name, part in PARTS.items() if not any(part in p.cmdline for p in running)]
    assert not missing, f"no {missing} among the demo's processes:\n" + "\n".join(map(str, running))


def assert_stopped(demo: Demo, seconds: float, *, exit_code: int) -> None:
    left = demo.processes()
    assert not left, f"left after {seconds:.1f} s:\n" + "\n".join(map(str, left))
    assert seconds <= STOP_BOUND_SECONDS, f"the demo took {seconds:.1f} s to stop"
    assert demo.run is not None
    assert demo.run.returncode == exit_code, demo.log_tail()
    taken = {name: port for name, port in demo.ports.items() if not port_is_free(port)}
    assert not taken, f"ports still taken: {taken}"


def port_is_free(port: int) -> bool:
    """Nothing listens on the loopback `port` (connections closing in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_sigterm_and_ctrl_c_leave_no_process_of_the_demo_and_a_second_start_comes_up(
    demo: Demo,
) -> None:
    """One clone started twice, stopped once by each signal: a start takes about 20 s."""
    demo.start()
    demo.wait_until_up()
    demo.wait_for_a_run()
    assert_every_part_runs(demo)
    oldest = demo.oldest_point()

    seconds = demo.stop(signal.SIGTERM)
    assert_stopped(demo, seconds, exit_code=128 + signal.SIGTERM)

    demo.start()
    demo.wait_until_up()
    demo.wait_for_a_run()
    assert_every_part_runs(demo)
    assert demo.oldest_point() == oldest  # InfluxDB's data survives a restart

    seconds = demo.stop(signal.SIGINT)
    assert_stopped(demo, seconds, exit_code=128 + signal.SIGINT)
