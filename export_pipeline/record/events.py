"""What the ledger records: materialization metadata and check evaluations, built from what an
export or a sweep found. `ledger.py` reads the same names back.

- A materialization of a device-day carries `exported_through` (the device's checkpoint after
  it: the end of the last slice whose objects are complete in S3) and `covered_through` (where
  the exported slices of that day end), with row counts, files and timings for the UI.
- A reconciliation evaluation carries InfluxDB's count of values per field and how much of the
  day it checked, which the late-data sweep compares with InfluxDB later. It is recorded per
  device-day under `reconciliation` (the ledger's record, read by key), and summed up for the UI
  by the `reconciled` check of each dataset: Dagster's UI reads a partitioned check's statuses
  one device at a time on every visit (94 s at 5,000 devices x a year, see bench/README.md, P10).
- A date of telemetry_daily (its partitions are dates) is materialized with its fleet's state:
  the day files' reconciliations of that date, summed up and the failed or missing named.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    MetadataValue,
)

from export_pipeline.engine.export import Exported
from export_pipeline.engine.grid import SECONDS_PER_DAY, day_start
from export_pipeline.engine.progress import Progress
from export_pipeline.engine.reconciliation import LateData, Reconciliation
from export_pipeline.record.keys import (
    CHECKED_THROUGH,
    COVERED_THROUGH,
    EXPORTED_THROUGH,
    FIELD_COUNTS,
    FRESHNESS,
    RECONCILIATION,
    TELEMETRY_EXPORT,
    DeviceDay,
)
from export_pipeline.settings import ExportSettings

FRESHNESS_INTERVALS = 3


# A device-day's slices are recorded as a materialization when an export starts or closes the day,
# and in between about once an hour (at a minute of the hour of the device's own, so a fleet's
# records spread over the hour): the device's progress is kept elsewhere, and a materialization
# per slice would make the ledger grow by gigabytes a day (see docs/operations.md).
PROGRESS_EVERY_SECONDS = 3600


def worth_recording(exported: Exported, previous: Progress | None, interval_seconds: int) -> bool:
    """Whether the export of a range of slices is recorded as a materialization."""
    piece = exported.piece
    if piece.start == 0 or piece.end == SECONDS_PER_DAY:
        return True
    if previous is None or previous.day != piece.day:
        return True  # the device's first export into this day
    marks = max(1, PROGRESS_EVERY_SECONDS // interval_seconds)
    offset = zlib.crc32(exported.report.device_id.encode()) % marks * interval_seconds
    before, after = (piece.start - offset), (piece.end - offset)
    return before // PROGRESS_EVERY_SECONDS != after // PROGRESS_EVERY_SECONDS


def materialization_metadata(exported: Exported, now: datetime) -> dict[str, Any]:
    """The metadata of a device-day's materialization after `exported` reached S3: the rows of
    the day so far where known (else of this export), where its slices end, and the device's
    checkpoint and lag."""
    report, piece, day = exported.report, exported.piece, exported.day_totals

    def stamp(value: datetime | None) -> str:
        return value.isoformat() if value else ""

    metadata: dict[str, Any] = {
        "dagster/row_count": day.rows if day is not None else report.rows,
        "rows_exported": report.rows,
        "dagster/uri": MetadataValue.path(report.folder_uri),
        COVERED_THROUGH: MetadataValue.timestamp(piece.end_time),
        "slices": f"{timedelta(seconds=piece.start)} to {timedelta(seconds=piece.end)} UTC",
        "files_written": len(report.files_written),
        "files_deleted": len(report.files_deleted),
        "bytes_written": report.bytes_written,
        "first_timestamp": stamp(report.first_timestamp),
        "last_timestamp": stamp(report.last_timestamp),
        "read_seconds": round(report.read_seconds, 3),
        "write_seconds": round(report.write_seconds, 3),
    }
    if exported.exported_through is not None:
        metadata[EXPORTED_THROUGH] = MetadataValue.timestamp(exported.exported_through)
        lag = (now - exported.exported_through).total_seconds()
        metadata["export_lag_seconds"] = round(lag, 1)
    return metadata


def materialization(
    exported: Exported, now: datetime, asset_key: AssetKey = TELEMETRY_EXPORT
) -> AssetMaterialization:
    """The event a run logs for a device-day it exported outside an asset's own step."""
    return AssetMaterialization(
        asset_key=asset_key,
        partition=DeviceDay(exported.report.device_id, exported.piece.day).key,
        metadata=materialization_metadata(exported, now),
    )


@dataclass(frozen=True)
class DayFileRecord:
    """What the ledger holds of a device-day's day file: its latest reconciliation (None while
    one runs), and the rows and files it found; None where the latest is the late-data sweep's,
    which counts InfluxDB only."""

    passed: bool | None
    rows: int | None
    files: int | None


def day_files_metadata(
    day: date, fleet: Sequence[str], records: Mapping[DeviceDay, DayFileRecord], uri: str
) -> dict[str, Any]:
    """The metadata of a date of telemetry_daily (the fleet's day files of `day`), from each
    device-day's record: what the UI shows of the date, and which devices it still lacks."""
    of_day = {device_day.device_id: r for device_day, r in records.items() if device_day.day == day}
    failed = sorted(device for device, r in of_day.items() if r.passed is False)
    missing = sorted(device for device in fleet if device not in of_day)
    return {
        "dagster/row_count": sum(r.rows or 0 for r in of_day.values()),
        "dagster/uri": MetadataValue.path(uri),
        "devices": len(fleet),
        "day_files": sum(r.files or 0 for r in of_day.values()),
        "device_days_reconciled": sum(1 for r in of_day.values() if r.passed),
        "device_days_failed": len(failed),
        "failed": MetadataValue.json(failed[:20]),
        "device_days_missing": len(missing),
        "missing": MetadataValue.json(missing[:20]),
    }


def reconciliation_metadata(result: Reconciliation) -> dict[str, Any]:
    exported = result.exported_field_counts or {}
    compared: dict[str, Any] = {
        "s3_field_counts": MetadataValue.json(exported),
        # Values S3 holds beyond InfluxDB's (negative: missing), over the four fields.
        "difference": sum(exported.values()) - sum(result.field_counts.values()),
    }
    return {
        **compared,
        "s3_rows": result.exported_rows,
        "files": result.files,
        "schema_mismatches": MetadataValue.json(result.schema_mismatches[:20]),
        CHECKED_THROUGH: MetadataValue.timestamp(
            day_start(result.day) + timedelta(seconds=result.through_offset)
        ),
        FIELD_COUNTS: MetadataValue.json(result.field_counts),
        "summary": result.description,
    }


def reconciliation_evaluation(
    result: Reconciliation, check: AssetCheckKey = RECONCILIATION
) -> AssetCheckEvaluation:
    """The reconciliation as an event a run logs for a device-day it closed."""
    return AssetCheckEvaluation(
        asset_key=check.asset_key,
        check_name=check.name,
        passed=result.passed,
        metadata=reconciliation_metadata(result),
        partition=DeviceDay(result.device_id, result.day).key,
        severity=AssetCheckSeverity.ERROR,
    )


def late_data_evaluation(
    late: LateData, check: AssetCheckKey = RECONCILIATION
) -> AssetCheckEvaluation:
    """A failed reconciliation for a device-day that changed in InfluxDB after it was
    reconciled: the continuous_export sensor exports the day again, which reconciles it anew."""
    return AssetCheckEvaluation(
        asset_key=check.asset_key,
        check_name=check.name,
        passed=False,
        metadata={
            "reconciled_field_counts": MetadataValue.json(late.reconciled),
            FIELD_COUNTS: MetadataValue.json(late.now),
            "summary": late.description,
        },
        partition=DeviceDay(late.device_id, late.day).key,
        severity=AssetCheckSeverity.ERROR,
    )


def lagging_devices(
    exported_through: Mapping[str, datetime],
    fleet: Sequence[str],
    now: datetime,
    settings: ExportSettings,
) -> dict[str, float]:
    """Devices more than FRESHNESS_INTERVALS intervals (plus the lateness allowance) behind."""
    allowed = FRESHNESS_INTERVALS * settings.interval_seconds + settings.lateness_seconds
    lag = {}
    for device_id in fleet:
        through = exported_through.get(device_id)
        seconds = (now - through).total_seconds() if through else float("inf")
        if seconds > allowed:
            lag[device_id] = seconds
    return lag


def freshness_evaluation(
    exported_through: Mapping[str, datetime],
    fleet: Sequence[str],
    now: datetime,
    settings: ExportSettings,
) -> AssetCheckEvaluation:
    """`freshness`: passes when no device of `fleet` is more than three intervals behind."""
    behind = lagging_devices(exported_through, fleet, now, settings)
    lags = [(now - exported_through[d]).total_seconds() for d in fleet if d in exported_through]
    worst = sorted(behind.items(), key=lambda item: -item[1])[:20]
    return AssetCheckEvaluation(
        asset_key=TELEMETRY_EXPORT,
        check_name=FRESHNESS.name,
        passed=not behind,
        metadata={
            "devices": len(fleet),
            "devices_behind": len(behind),
            "max_export_lag_seconds": max(lags, default=0.0),
            "behind": MetadataValue.json(
                {d: (None if s == float("inf") else round(s)) for d, s in worst}
            ),
        },
        severity=AssetCheckSeverity.WARN,
    )


def reconciled_evaluation(
    check: AssetCheckKey, latest: Mapping[DeviceDay, bool | None], days: Sequence[date]
) -> AssetCheckEvaluation:
    """`reconciled`: passes when no closed device-day of `days` failed its latest
    reconciliation (`latest`: each evaluated device-day's outcome, None while one runs). A
    failed device-day is exported again by the continuous_export sensor; it is named here until
    its new reconciliation passes."""
    failed = sorted(
        (device_day for device_day, passed in latest.items() if passed is False),
        key=lambda device_day: (device_day.day, device_day.device_id),
    )
    passed = sum(1 for outcome in latest.values() if outcome)
    span = f"{min(days)} to {max(days)}" if days else "none"
    names = [f"{device_id} {day.isoformat()}" for device_id, day in failed[:20]]
    description = (
        f"{passed} device-days closed from {span} match InfluxDB"
        if not failed
        else f"{len(failed)} device-days closed from {span} do not match InfluxDB (exported "
        f"again; see their `reconciliation` in the run logs): {', '.join(names)}"
        + (", ..." if len(failed) > len(names) else "")
    )
    return AssetCheckEvaluation(
        asset_key=check.asset_key,
        check_name=check.name,
        passed=not failed,
        metadata={
            "days": span,
            "device_days_reconciled": passed,
            "device_days_failed": len(failed),
            "failed": MetadataValue.json(names),
        },
        severity=AssetCheckSeverity.ERROR,
        description=description,
    )


def summary_digest(evaluations: Sequence[AssetCheckEvaluation]) -> str:
    """What changes when a summary is worth recording again: its outcome, the device-days it
    names, its days (not its counts, which move with every device-day reconciled)."""
    parts = [
        f"{e.asset_key.to_user_string()}:{e.passed}:{e.metadata['days'].value}:"
        f"{e.metadata['device_days_failed'].value}:{e.metadata['failed'].value}"
        for e in evaluations
    ]
    return f"{zlib.crc32(repr(parts).encode()):08x}"
