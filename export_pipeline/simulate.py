"""Demo telemetry: a small fleet of plausible devices writing to InfluxDB with the line protocol.

    python -m export_pipeline.simulate --devices 5 --hours 24      # history, then exit
    python -m export_pipeline.simulate --devices 5 --follow        # and one point a second after

Each device has a type with its own electrical profile (a bulb draws ~0.26 A at 230 V, a compressor
cycles between idle and ~6 A), a daily temperature swing and some noise, so the exported columns,
power_factor included, look like the real thing.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import requests

from export_pipeline.settings import InfluxSettings, SettingsError, load_env_file, parse_influx

NS = 1_000_000_000


@dataclass(frozen=True)
class Profile:
    device_type: str
    watts: float  # typical active power when on
    power_factor: float
    duty_cycle: float  # share of time switched on


PROFILES = (
    Profile("bulb", 60.0, 0.98, 0.6),
    Profile("compressor", 1_200.0, 0.82, 0.45),
    Profile("heater", 2_000.0, 0.99, 0.35),
    Profile("fan", 75.0, 0.9, 0.7),
    Profile("pump", 750.0, 0.85, 0.3),
)
LOCATIONS = ("kitchen", "warehouse", "office", "roof", "basement")


@dataclass(frozen=True)
class Device:
    device_id: str
    profile: Profile
    location: str

    def line(self, time_ns: int, measurement: str) -> str:
        seconds = time_ns // NS
        # The on/off state changes once a minute, the same in every run.
        on = random.Random(f"{self.device_id}:{seconds // 60}").random() < self.profile.duty_cycle
        voltage = 230.0 + random.gauss(0, 1.5)
        watts = self.profile.watts * (1 + random.gauss(0, 0.03)) if on else 0.5
        current = watts / (voltage * self.profile.power_factor)
        day_phase = 2 * math.pi * (seconds % 86_400) / 86_400
        temperature = 18 + 5 * math.sin(day_phase - math.pi / 2) + random.gauss(0, 0.2)
        return (
            f"{measurement},device_id={self.device_id},device_type={self.profile.device_type},"
            f"location={self.location} voltage={voltage:.2f},current={current:.3f},"
            f"power={watts:.1f},temperature={temperature:.2f} {time_ns}"
        )


def fleet(count: int) -> list[Device]:
    return [
        Device(f"device-{i:03d}", PROFILES[i % len(PROFILES)], LOCATIONS[i % len(LOCATIONS)])
        for i in range(1, count + 1)
    ]


class Writer:
    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        if settings.token:
            self.session.headers["Authorization"] = f"Token {settings.token}"
        elif settings.username:
            self.session.auth = (settings.username, settings.password)

    def create_database(self) -> None:
        """InfluxDB 1.x only; on 2.x the bucket is created with the server (docker-compose)."""
        name = self.settings.bucket.replace('"', "")
        self.session.post(
            f"{self.settings.url}/query", params={"q": f'CREATE DATABASE "{name}"'}, timeout=30
        ).raise_for_status()

    def write(self, lines: list[str]) -> None:
        answer = self.session.post(
            f"{self.settings.url}/write",
            params={"db": self.settings.bucket, "precision": "ns"},
            data="\n".join(lines).encode(),
            timeout=60,
        )
        if answer.status_code != 204:
            raise RuntimeError(f"InfluxDB refused the write ({answer.status_code}): {answer.text}")


def main(argv: list[str] | None = None) -> int:
    load_env_file()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--hours", type=float, default=0, help="history to write first")
    parser.add_argument("--step", type=int, default=10, help="seconds between history points")
    parser.add_argument("--follow", action="store_true", help="then write one point a second")
    parser.add_argument("--create-database", action="store_true", help="InfluxDB 1.x only")
    args = parser.parse_args(argv)
    try:
        settings = parse_influx(os.environ)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    writer, devices = Writer(settings), fleet(args.devices)
    if args.create_database:
        writer.create_database()
    # History on multiples of the step: writing it again (the demo restarted) rewrites the same
    # points instead of adding as many between them.
    step = args.step * NS
    now = time.time_ns() // step * step
    start = now - int(args.hours * 3600) * NS // step * step
    lines: list[str] = []
    for stamp in range(start, now, step):
        lines.extend(device.line(stamp, settings.measurement) for device in devices)
        if len(lines) >= 5_000:
            writer.write(lines)
            lines = []
    if lines:
        writer.write(lines)
    print(f"wrote {args.hours:g} h of history for {len(devices)} devices to {settings.url}")
    while args.follow:
        second = time.time_ns() // NS * NS
        writer.write([device.line(second, settings.measurement) for device in devices])
        time.sleep(max(0.0, 1 - (time.time_ns() - second) / NS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
