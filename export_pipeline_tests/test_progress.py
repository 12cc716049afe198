"""A device's progress: its checkpoint, and what its current day's slices hold (pure rules)."""

import json
import zlib
from datetime import UTC, date, datetime

import pytest

from export_pipeline.defs.planning import first_due
from export_pipeline.engine.dataset import ExportReport
from export_pipeline.engine.export import Exported
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.progress import DayTotals, Progress, carried
from export_pipeline.record.events import worth_recording
from export_pipeline.record.progress import (
    PROGRESS_FORM,
    RecordFormError,
    progress_json,
    progress_of_json,
)
from export_pipeline.settings import SEED_FIELDS, ExportSettings

DAY, NEXT = date(2026, 2, 7), date(2026, 2, 8)


def utc(day: date, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def totals(rows: int, files: int = 1) -> DayTotals:
    return DayTotals(rows, files, {"voltage": rows, "current": 0, "power": rows, "temperature": 0})


def test_the_checkpoint_moves_only_over_contiguous_coverage_and_never_back() -> None:
    settings = ExportSettings(interval_seconds=60, lookback_hours=24)
    start = first_due(utc(NEXT, 10), settings)  # a new device would start at 02-07 10:00
    today = DayRange(NEXT, 0, 36_000)
    inside = Progress(utc(NEXT, 1), NEXT, None)
    assert carried(inside, today, totals(1), start).through == utc(NEXT, 10)  # type: ignore[union-attr]
    ahead = Progress(utc(NEXT, 12), NEXT, None)
    assert carried(ahead, today, totals(1), start).through == utc(NEXT, 12)  # type: ignore[union-attr]
    gap = Progress(utc(date(2026, 2, 6)), date(2026, 2, 6), None)
    assert carried(gap, today, totals(1), start) == gap
    # No progress: only a range covering where the sensor would start a device gives some.
    assert carried(None, DayRange.whole(DAY), totals(1), start) == Progress(
        utc(NEXT), DAY, totals(1)
    )
    assert carried(None, today, totals(1), start) is None
    assert carried(None, DayRange.whole(date(2026, 2, 1)), totals(1), start) is None


def test_a_days_totals_add_up_over_its_contiguous_ranges() -> None:
    first = carried(None, DayRange(DAY, 0, 60), totals(5), utc(DAY))
    assert first == Progress(utc(DAY, 0, 1), DAY, totals(5))
    second = carried(first, DayRange(DAY, 60, 180), totals(7, files=2), utc(DAY))
    assert second == Progress(utc(DAY, 0, 3), DAY, DayTotals(12, 3, totals(12).counts))
    # The next day starts its own totals.
    assert carried(
        Progress(utc(NEXT), DAY, totals(9)), DayRange(NEXT, 0, 60), totals(2), utc(DAY)
    ) == Progress(utc(NEXT, 0, 1), NEXT, totals(2))


def test_overlapping_ranges_leave_a_days_totals_unknown_until_it_is_exported_whole() -> None:
    progress = Progress(utc(DAY, 0, 3), DAY, totals(12))
    overlap = carried(progress, DayRange(DAY, 60, 240), totals(4), utc(DAY))
    assert overlap == Progress(utc(DAY, 0, 4), DAY, None)
    # The day so far, all of it again, makes them known again; a range of an older day does
    # not touch today's.
    whole = carried(overlap, DayRange(DAY, 0, 300), totals(20), utc(DAY))
    assert whole == Progress(utc(DAY, 0, 5), DAY, totals(20))
    older = carried(whole, DayRange.whole(date(2026, 2, 6)), totals(99), utc(DAY))
    assert older == whole
    # ...but the day so far stopping short of the checkpoint does not tell what is beyond it.
    assert carried(whole, DayRange(DAY, 0, 120), totals(8), utc(DAY)) == Progress(
        utc(DAY, 0, 5), DAY, None
    )


def test_progress_survives_its_round_trip_through_the_record() -> None:
    for progress in (Progress(utc(DAY, 7), DAY, totals(3)), Progress(utc(NEXT), DAY, None)):
        assert progress_of_json(progress_json(progress), key="progress/d") == progress


def test_progress_stored_in_the_first_form_reads_as_the_same_progress() -> None:
    """Form 1 (no `v`, the totals a list in the four fields' order), as an earlier release, or
    one of its runs still in flight during an upgrade, stores it."""
    through = utc(DAY, 7)
    first_form = json.dumps(
        {"through": through.timestamp(), "day": DAY.isoformat(), "totals": [12, 3, [1, 2, 3, 4]]}
    )
    counts = dict(zip(SEED_FIELDS, [1, 2, 3, 4], strict=True))
    expected = Progress(through, DAY, DayTotals(12, 3, counts))
    assert progress_of_json(first_form, key="progress/d") == expected
    assert json.loads(progress_json(expected))["v"] == PROGRESS_FORM


@pytest.mark.parametrize("form", [0, PROGRESS_FORM + 1, "2"])
def test_progress_of_a_form_this_release_does_not_read_is_refused_naming_key_and_form(
    form: object,
) -> None:
    text = json.dumps({"v": form, "through": 0, "day": DAY.isoformat(), "totals": None})
    with pytest.raises(RecordFormError, match=rf"progress/device-7: progress of form {form!r}"):
        progress_of_json(text, key="progress/device-7")


def test_a_days_slices_are_recorded_at_its_ends_and_hourly_at_the_devices_own_minute() -> None:
    def recorded(device: str, start: int, end: int, previous: Progress | None) -> bool:
        piece = DayRange(DAY, start, end)
        exported = Exported(piece, ExportReport(device, DAY, "s3://b/p"), None)
        return worth_recording(exported, previous, interval_seconds=60)

    earlier = Progress(utc(DAY, 12), DAY, None)
    devices = [f"dev-{n}" for n in range(200)]
    minutes = {device: zlib.crc32(device.encode()) % 60 for device in devices}
    assert len(set(minutes.values())) > 30  # a fleet's records spread over the hour
    for device, minute in minutes.items():
        mark = 12 * 3600 + minute * 60  # 12:mm, the device's own minute
        one_minute = [recorded(device, s, s + 60, earlier) for s in range(43_200, 46_800, 60)]
        assert one_minute.count(True) == 1  # once in every hour of one-minute ticks...
        assert recorded(device, mark - 60, mark, earlier) is True  # ...the slice ending at it
        assert recorded(device, mark, mark + 60, earlier) is False
        assert recorded(device, mark - 120, mark - 60, earlier) is False
        assert recorded(device, mark - 120, mark + 60, earlier) is True  # a longer tick too
    # The day's first export, its start and its close are always recorded.
    assert recorded("dev-0", 43_200, 43_260, None) is True
    assert recorded("dev-0", 43_200, 43_260, Progress(utc(DAY), date(2026, 2, 6), None)) is True
    assert recorded("dev-0", 0, 60, earlier) is True
    assert recorded("dev-0", 86_340, 86_400, earlier) is True
