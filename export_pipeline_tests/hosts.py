"""Hosts of the tests' own making: network namespaces with a hostname each, joined to this
machine by veth links on a bridge, reaching the servers on this machine's loopback only through
forwarders the test starts on the bridge's address. Nothing leaves the machine: the namespaces
have no route beyond the bridge, and the bridge none beyond this host.

Needs root (`ip netns`), as `.ci/run` has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from export_pipeline_tests.services import TcpProxy, free_port, wait_until


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """A namespace with its own address and hostname; its processes are killed with it."""

    name: str  # its hostname
    namespace: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, command: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        """`command` in the namespace, under this host's name (a UTS namespace of its own)."""
        wrapped = [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh",
            *command,
        ]  # fmt: skip
        with log.open("ab") as output:
            self.processes.append(
                subprocess.Popen(
                    wrapped, env=dict(env), stdout=output, stderr=output, start_new_session=True
                )
            )

    def pids(self) -> list[int]:
        answer = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in answer.stdout.split()]

    def kill(self) -> None:
        """Every process of the host, at once, as a host that loses its power."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


class Network:
    """A bridge on this machine and `count` hosts on it; `forward` makes a loopback server
    reachable from them."""

    def __init__(self, count: int) -> None:
        tag = os.getpid() % 10_000
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.bridge = f"epbr{tag}"
        self.address = f"{self.subnet}.1"  # this machine's, on the bridge
        self.hosts = [
            Host(f"worker-{i + 1}", f"ep{tag}w{i + 1}", f"{self.subnet}.{11 + i}")
            for i in range(count)
        ]
        self.forwarders: list[TcpProxy] = []

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for index, host in enumerate(self.hosts):
            outside, inside = f"{self.bridge}h{index}", f"{self.bridge}n{index}"
            ip("netns", "add", host.namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            ip("link", "set", inside, "netns", host.namespace)
            inns = ("netns", "exec", host.namespace, "ip")
            ip(*inns, "addr", "add", f"{host.address}/24", "dev", inside)
            ip(*inns, "link", "set", inside, "up")
            ip(*inns, "link", "set", "lo", "up")

    def reaches(self, address: str) -> bool:
        """Every host connects to `address` (host:port)."""
        host_part, port = address.rsplit(":", 1)
        probe = f"import socket; socket.create_connection(({host_part!r}, {port}), timeout=1)"
        for host in self.hosts:
            command = ["ip", "netns", "exec", host.namespace, sys.executable, "-c", probe]
            if subprocess.run(command, capture_output=True, check=False).returncode != 0:
                return False
        return True

    def forward(self, port: int) -> str:
        """The address (host:port) at which the hosts reach this machine's loopback `port`."""
        proxy = TcpProxy(f"tcp://127.0.0.1:{port}", listen=self.address)
        proxy.start()
        self.forwarders.append(proxy)
        address = f"{self.address}:{proxy.port}"
        wait_until(lambda: self.reaches(address), f"the hosts' way to port {port}")
        return address

    def remove(self) -> None:
        for host in self.hosts:
            host.kill()
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        for proxy in self.forwarders:
            proxy.stop()


@contextlib.contextmanager
def network(count: int) -> Iterator[Network]:
    """`count` hosts, removed with their processes afterwards, whatever happened."""
    made = Network(count)
    try:
        made.create()
        yield made
    finally:
        made.remove()


class RedisServer:
    """`redis-server` from Debian's package on a free loopback port, keeping nothing on disk:
    the broker and result backend of the Celery workers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


WORKERS_YAML = Path(__file__).resolve().parent.parent / "deploy" / "workers" / "dagster.yaml"


def start_workers(
    hosts: Network, env: Mapping[str, str], root: Path, *, influx: int, s3: int, redis: int
) -> None:
    """A worker (`python -m export_pipeline.workers`) on each host, with `env` as this machine
    sees the services (`influx`, `s3`, `redis`: their loopback ports; PostgreSQL the machine's)
    turned into that host's view: every address one on its link, and a DAGSTER_HOME of its own
    holding the workers' instance. Logs in `root`."""
    from export_pipeline_tests.services import POSTGRES

    postgres = hosts.forward(int(str(POSTGRES["port"]))).split(":")
    influx_there, s3_there, broker = (hosts.forward(port) for port in (influx, s3, redis))
    for host in hosts.hosts:
        home = root / host.name
        home.mkdir()
        shutil.copy(WORKERS_YAML, home / "dagster.yaml")
        there = {
            **env,
            "DAGSTER_HOME": str(home),
            "INFLUXDB_URL": f"http://{influx_there}",
            "S3_ENDPOINT_URL": f"http://{s3_there}",
            "CHECKPOINT_DB_HOST": postgres[0],
            "CHECKPOINT_DB_PORT": postgres[1],
            "CELERY_BROKER_URL": f"redis://{broker}/0",
            "CELERY_RESULT_BACKEND": f"redis://{broker}/1",
        }
        command = [sys.executable, "-m", "export_pipeline.workers"]
        host.start(command, there, root / f"{host.name}.log")
