"""A device's progress: its checkpoint, and what the slices exported of its latest day hold.

The checkpoint (`through`) is the end of the last slice whose objects are complete in S3; it
advances only over contiguous coverage, so a range exported beyond a gap never makes the sensor
skip the gap, and an older range never moves it back. Alongside, the totals of the day being
filled (rows, files and values per field) let the day be reconciled when it closes from one count
query and one listing, instead of reading the day and every object's footer again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

from export_pipeline.engine.grid import DayRange


@dataclass(frozen=True)
class DayTotals:
    """What a day's exported slices hold: rows, files, and values per field."""

    rows: int = 0
    files: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)

    def __add__(self, other: DayTotals) -> DayTotals:
        """Both days' values per field; a field one of them did not export (it appeared in
        InfluxDB later) counts none there."""
        names = [*self.counts, *(name for name in other.counts if name not in self.counts)]
        counts = {name: self.counts.get(name, 0) + other.counts.get(name, 0) for name in names}
        return DayTotals(self.rows + other.rows, self.files + other.files, counts)


@dataclass(frozen=True)
class Progress:
    """`totals` are those of `day`, the day of the latest exported range; None when not known
    exactly (the day was exported in overlapping pieces): it is then exported again whole."""

    through: datetime
    day: date
    totals: DayTotals | None


def carried(
    progress: Progress | None, piece: DayRange, totals: DayTotals, first_due: datetime
) -> Progress | None:
    """The device's progress once `piece`, holding `totals`, is complete in S3.

    A device without progress gets some only from a range covering `first_due`, where the sensor
    would start it (and its day's totals are known only if the range starts the day).
    """
    if progress is None:
        if not piece.start_time <= first_due <= piece.end_time:
            return None
        return Progress(piece.end_time, piece.day, totals if piece.start == 0 else None)
    if progress.through < piece.start_time:
        return progress  # a gap before the range: nothing moves
    through = max(progress.through, piece.end_time)
    if piece.day < progress.day:
        return Progress(through, progress.day, progress.totals)  # an older day again
    if piece.day > progress.day:
        return Progress(through, piece.day, totals if piece.start == 0 else None)
    if piece.start_time == progress.through and progress.totals is not None:
        return Progress(through, piece.day, progress.totals + totals)  # the day continued
    if piece.start == 0 and piece.end_time >= progress.through:
        return Progress(through, piece.day, totals)  # the day so far, all of it again
    return Progress(through, piece.day, None)  # overlapping pieces: not known exactly
