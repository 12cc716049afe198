from datetime import UTC, date, datetime

import pyarrow as pa
import pytest

from export_pipeline.engine.grid import Slice, day_bounds_ns, day_slices, slice_offsets

DAY = date(2026, 2, 7)
NS = 1_000_000_000


def test_a_day_is_cut_into_half_open_aligned_slices() -> None:
    slices = day_slices(DAY, 300)
    assert len(slices) == 288
    assert slices[0].start == datetime(2026, 2, 7, tzinfo=UTC)
    assert slices[1].start == slices[0].end
    assert slices[-1].end == datetime(2026, 2, 8, tzinfo=UTC)


@pytest.mark.parametrize("interval", [7, 0, -300, 86_401])
def test_an_interval_that_does_not_divide_a_day_is_refused_by_name(interval: int) -> None:
    with pytest.raises(ValueError, match="EXPORT_INTERVAL_SECONDS"):
        day_slices(DAY, interval)


def test_a_point_exactly_on_a_slice_start_belongs_to_that_slice() -> None:
    start, _ = day_bounds_ns(DAY)
    times = pa.array([start, start + 300 * NS - 1, start + 300 * NS, start + 86_399 * NS])
    assert slice_offsets(times, DAY, 300).to_pylist() == [0, 0, 300, 86_100]


def test_slice_start_and_end_are_utc_datetimes() -> None:
    piece = Slice(DAY, 3600, 60)
    assert piece.start == datetime(2026, 2, 7, 1, 0, tzinfo=UTC)
    assert piece.end == datetime(2026, 2, 7, 1, 1, tzinfo=UTC)
