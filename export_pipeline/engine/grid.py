"""A UTC day cut into half-open, interval-aligned slices `[start, end)`.

Slices are the unit of export: one object per slice that has rows, named by the slice's start, so
the same day always maps to the same keys and a rerun overwrites rather than duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from export_pipeline.engine.schema import constant

NS_PER_SECOND = 1_000_000_000
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, order=True)
class Slice:
    """One interval of a day: `offset` seconds after midnight UTC, `length` seconds long."""

    day: date
    offset: int
    length: int

    @property
    def start(self) -> datetime:
        return day_start(self.day) + timedelta(seconds=self.offset)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.length)


def check_interval(interval_seconds: int) -> None:
    if interval_seconds <= 0 or SECONDS_PER_DAY % interval_seconds:
        raise ValueError(
            f"EXPORT_INTERVAL_SECONDS={interval_seconds} does not divide a day (86400 s) evenly"
        )


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def day_bounds_ns(day: date) -> tuple[int, int]:
    """The day as `[start, end)` in epoch nanoseconds, the unit InfluxDB answers in."""
    start = int(day_start(day).timestamp()) * NS_PER_SECOND
    return start, start + SECONDS_PER_DAY * NS_PER_SECOND


def day_slices(day: date, interval_seconds: int) -> list[Slice]:
    check_interval(interval_seconds)
    return [
        Slice(day, offset, interval_seconds)
        for offset in range(0, SECONDS_PER_DAY, interval_seconds)
    ]


def slice_offsets(timestamps_ns: pa.Array, day: date, interval_seconds: int) -> pa.Array:
    """Each timestamp's slice, as seconds after midnight of the slice start (vectorised)."""
    check_interval(interval_seconds)
    start_ns, _ = day_bounds_ns(day)
    interval_ns = interval_seconds * NS_PER_SECOND
    since_midnight = pc.subtract(timestamps_ns, constant(start_ns, pa.int64()))
    index = pc.floor(
        pc.divide(pc.cast(since_midnight, pa.float64()), constant(float(interval_ns), pa.float64()))
    )
    return pc.multiply(pc.cast(index, pa.int64()), constant(interval_seconds, pa.int64()))


@dataclass(frozen=True, order=True)
class DayRange:
    """Whole slices `[start, end)` of one UTC day, as seconds after midnight: one unit of work."""

    day: date
    start: int
    end: int

    @classmethod
    def whole(cls, day: date) -> DayRange:
        return cls(day, 0, SECONDS_PER_DAY)

    @property
    def start_time(self) -> datetime:
        return day_start(self.day) + timedelta(seconds=self.start)

    @property
    def end_time(self) -> datetime:
        return day_start(self.day) + timedelta(seconds=self.end)


def align_down(moment: datetime, interval_seconds: int) -> datetime:
    """The start of the slice containing `moment`."""
    seconds = int(moment.timestamp())
    return datetime.fromtimestamp(seconds - seconds % interval_seconds, tz=UTC)


def closed_until(now: datetime, *, interval_seconds: int, lateness_seconds: int) -> datetime:
    """End of the last slice that closed at least `lateness_seconds` ago: everything before it is
    final, so exporting it now gives the same files as exporting it later."""
    return align_down(now - timedelta(seconds=lateness_seconds), interval_seconds)


def day_ranges(*, start: datetime, end: datetime) -> list[DayRange]:
    """`[start, end)` cut at UTC midnights, so slices crossing a day land in their own date."""
    ranges = []
    cursor = start
    while cursor < end:
        midnight = day_start(cursor.date())
        next_midnight = midnight + timedelta(days=1)
        stop = min(end, next_midnight)
        ranges.append(
            DayRange(
                cursor.date(),
                int((cursor - midnight).total_seconds()),
                int((stop - midnight).total_seconds()),
            )
        )
        cursor = stop
    return ranges


def days_closed_by(ranges: Mapping[str, Iterable[DayRange]]) -> list[tuple[str, int, int]]:
    """`(device, start_ns, end_ns)` of each device-day that these ranges close (a closed day is
    reconciled with InfluxDB's count), for counting many devices with one query."""
    return [
        (device_id, *day_bounds_ns(piece.day))
        for device_id, pieces in ranges.items()
        for piece in pieces
        if piece.end == SECONDS_PER_DAY
    ]
