"""Fill InfluxDB fast with synthetic 1 Hz telemetry: line protocol in large batches over /write.

    python -m bench.load --url http://127.0.0.1:8086 --db bench --devices 10 --hours 24

Lines are built per device with vectorised NumPy formatting and posted by two threads, which
reaches the ~120k points/s InfluxDB 1.6 ingests on this machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

NS = 1_000_000_000
BATCH = 20_000


def device_lines(device: str, start_ns: int, count: int, step_ns: int) -> Iterator[bytes]:
    """Batches of line protocol for one device, `count` points `step_ns` apart."""
    rng = np.random.default_rng(abs(hash(device)) % 2**32)
    for first in range(0, count, BATCH):
        n = min(BATCH, count - first)
        times = start_ns + (first + np.arange(n, dtype=np.int64)) * step_ns
        voltage = 230 + rng.normal(0, 1.5, n)
        current = np.abs(rng.normal(2, 0.5, n))
        power = voltage * current * 0.9
        temperature = 20 + rng.normal(0, 0.5, n)
        head = f"telemetry,device_id={device},device_type=pump,location=bench "
        rows = (
            f"{head}voltage={v:.2f},current={c:.3f},power={p:.1f},temperature={t:.2f} {ts}"
            for v, c, p, t, ts in zip(
                voltage.tolist(),
                current.tolist(),
                power.tolist(),
                temperature.tolist(),
                times.tolist(),
                strict=True,
            )
        )
        yield "\n".join(rows).encode()


def load(url: str, db: str, devices: list[str], start_ns: int, count: int, step_ns: int) -> float:
    """Write the points; return points per second."""
    session = requests.Session()
    session.post(f"{url}/query", params={"q": f'CREATE DATABASE "{db}"'}, timeout=30)

    def post(body: bytes) -> None:
        answer = session.post(
            f"{url}/write", params={"db": db, "precision": "ns"}, data=body, timeout=300
        )
        if answer.status_code != 204:
            raise RuntimeError(f"write failed: {answer.status_code} {answer.text[:200]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for device in devices:
            list(pool.map(post, device_lines(device, start_ns, count, step_ns)))
    return len(devices) * count / (time.perf_counter() - started)


def load_simulated(url: str, db: str, devices: int, start_ns: int, seconds: int) -> list[str]:
    """The demo's simulator (export_pipeline.simulate) at 1 Hz: `seconds` of its first
    `devices` devices from `start_ns`; returns their ids."""
    from export_pipeline.simulate import fleet

    session = requests.Session()
    session.post(f"{url}/query", params={"q": f'CREATE DATABASE "{db}"'}, timeout=30)
    simulated = fleet(devices)
    for first in range(0, seconds, 4_000):
        lines = [
            device.line(start_ns + second * NS, "telemetry")
            for second in range(first, min(seconds, first + 4_000))
            for device in simulated
        ]
        answer = session.post(
            f"{url}/write", params={"db": db, "precision": "ns"}, data="\n".join(lines), timeout=300
        )
        if answer.status_code != 204:
            raise RuntimeError(f"write failed: {answer.status_code} {answer.text[:200]}")
    return [device.device_id for device in simulated]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8086")
    parser.add_argument("--db", default="bench")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--hours", type=float, default=24)
    parser.add_argument("--start", default="2026-02-07T00:00:00Z")
    args = parser.parse_args()
    start = int(np.datetime64(args.start.rstrip("Z"), "s").astype(np.int64)) * NS
    count = int(args.hours * 3600)
    rate = load(
        args.url, args.db, [f"bench-{i:04d}" for i in range(args.devices)], start, count, NS
    )
    print(f"{args.devices * count} points at {rate:,.0f} points/s")


if __name__ == "__main__":
    main()
