"""Where an export lives in S3: the one place that builds and parses object keys.

Slices, seed layout:  {prefix}/device_id={id}/date={YYYY}/{MM}/{DD}/export_{HHMMSS}.{ext}
Slices, hive layout:  {prefix}/device_id={id}/date={YYYY}-{MM}-{DD}/export_{HHMMSS}.{ext}
Day files:            {daily_prefix}/device_id={id}/date={YYYY}-{MM}-{DD}/data.parquet (always hive)

A device id becomes a path segment and a Dagster partition key verbatim, so ids that could escape
their folder or break a partition key are refused rather than encoded.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date

from export_pipeline.engine.grid import Slice
from export_pipeline.settings import devices_root

MAX_DEVICE_ID_LENGTH = 128
EXTENSIONS = ("parquet", "csv")
_SLICE_NAME = re.compile(r"export_(\d{2})(\d{2})(\d{2})\.(parquet|csv)")


class DeviceIdError(ValueError):
    """A device id that cannot be a safe S3 path segment or Dagster partition key."""


def validate_device_id(device_id: str) -> str:
    """Return `device_id` unchanged, or raise DeviceIdError saying what makes it unsafe."""
    reason = _unsafe_reason(device_id)
    if reason:
        raise DeviceIdError(f"device id {shown_id(device_id)} is refused: {reason}")
    return device_id


def shown_id(device_id: str, most: int = 80) -> str:
    """An id as a message shows it: quoted, escaped, and cut to `most` characters (a tag value
    can be 64 KB, and any writer to InfluxDB chooses it)."""
    if len(device_id) <= most:
        return repr(device_id)
    return f"{device_id[:most]!r}… ({len(device_id):,} characters)"


def _unsafe_reason(device_id: str) -> str | None:
    if not device_id:
        return "it is empty"
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        return f"it is {len(device_id)} characters long, over the limit of {MAX_DEVICE_ID_LENGTH}"
    if "/" in device_id:
        return "'/' would split the S3 path"
    if "\\" in device_id:
        # SeaweedFS (and other stores with a filesystem behind) read it as '/' in a key.
        return "'\\' is a path separator to some S3 servers (SeaweedFS reads it as '/')"
    if ".." in device_id:
        return "'..' is a path traversal"
    if "|" in device_id:
        return "'|' separates the dimensions of a Dagster partition key"
    if any(unicodedata.category(ch) == "Cc" for ch in device_id):
        return "it contains a control character (newline, tab, NUL, ...)"
    if device_id != device_id.strip():
        return "it has leading or trailing white space"
    return None


def device_root(prefix: str, *, device_id: str) -> str:
    """The folder holding all of one device's days, with a trailing slash."""
    validate_device_id(device_id)
    return f"{devices_root(prefix)}{device_id}/"


def device_folder(prefix: str, *, device_id: str, day: date, layout: str) -> str:
    """The folder of one device-day, with a trailing slash; one Dagster partition."""
    root = device_root(prefix, device_id=device_id)
    if layout == "hive":
        day_part = f"date={day:%Y-%m-%d}"
    elif layout == "seed":
        day_part = f"date={day:%Y}/{day:%m}/{day:%d}"
    else:
        raise ValueError(f"EXPORT_LAYOUT={layout!r} is not one of seed, hive")
    return f"{root}{day_part}/"


def slice_name(piece: Slice, fmt: str) -> str:
    if fmt not in EXTENSIONS:
        raise ValueError(f"EXPORT_FORMAT={fmt!r} is not one of {', '.join(EXTENSIONS)}")
    hours, rest = divmod(piece.offset, 3600)
    return f"export_{hours:02d}{rest // 60:02d}{rest % 60:02d}.{fmt}"


def slice_key(prefix: str, *, device_id: str, piece: Slice, layout: str, fmt: str) -> str:
    folder = device_folder(prefix, device_id=device_id, day=piece.day, layout=layout)
    return folder + slice_name(piece, fmt)


DAY_FILE_NAME = "data.parquet"


def day_file_key(daily_prefix: str, *, device_id: str, day: date) -> str:
    """The one object of a closed device-day in telemetry_daily. Hive-style whatever
    EXPORT_LAYOUT is, so query engines see `device_id` and `date` as partition columns."""
    folder = device_folder(daily_prefix, device_id=device_id, day=day, layout="hive")
    return folder + DAY_FILE_NAME


def slice_offset_of(name: str) -> int | None:
    """The slice offset (seconds after midnight) an object name stands for, or None if not ours."""
    match = _SLICE_NAME.fullmatch(name)
    if not match:
        return None
    hours, minutes, seconds = (int(g) for g in match.groups()[:3])
    if hours > 23 or minutes > 59 or seconds > 59:
        return None
    return hours * 3600 + minutes * 60 + seconds


def day_files_glob(daily_prefix: str, *, day: date) -> str:
    """Every device's day file of `day`, as a glob for query engines: a date of telemetry_daily."""
    return f"{devices_root(daily_prefix)}*/date={day.isoformat()}/{DAY_FILE_NAME}"
