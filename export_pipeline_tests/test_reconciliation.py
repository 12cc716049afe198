"""Which reconciled device-days changed in InfluxDB since: a pure comparison of counts."""

import io
from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq

from export_pipeline.engine.reconciliation import LateData, footer_bytes, footer_of, late_data

DAY, NEXT = date(2026, 2, 7), date(2026, 2, 8)
ZERO = {"voltage": 0, "current": 0, "power": 0, "temperature": 0}


def counts(**values: int) -> dict[str, int]:
    return {**ZERO, **values}


def test_unchanged_counts_are_not_late_data() -> None:
    reconciled = {("D1", DAY): counts(voltage=10), ("D2", DAY): counts()}
    assert late_data(reconciled, {DAY: {"D1": counts(voltage=10)}}) == []


def test_a_field_count_that_grew_is_late_data() -> None:
    reconciled = {("D1", DAY): counts(voltage=10), ("D2", NEXT): counts(power=3, current=3)}
    now = {DAY: {"D1": counts(voltage=10, temperature=1)}, NEXT: {"D2": counts(power=2, current=4)}}
    assert late_data(reconciled, now) == [
        LateData("D1", DAY, counts(voltage=10), counts(voltage=10, temperature=1)),
        LateData("D2", NEXT, counts(power=3, current=3), counts(power=2, current=4)),
    ]


def test_counts_that_only_fell_are_not_late_data() -> None:
    # Retention expired (the day is gone from InfluxDB) or points were deleted: S3 keeps them.
    reconciled = {("D1", DAY): counts(voltage=10), ("D2", DAY): counts(power=3)}
    assert late_data(reconciled, {DAY: {"D2": counts(power=1)}}) == []


def test_a_day_exported_empty_that_now_has_points_is_late_data() -> None:
    (late,) = late_data({("D1", DAY): counts()}, {DAY: {"D1": counts(current=4)}})
    assert late.description == "InfluxDB changed after the day was reconciled: current 0 -> 4"


def test_device_days_that_were_never_reconciled_are_not_compared() -> None:
    assert late_data({}, {DAY: {"D1": counts(voltage=1)}}) == []


def test_a_footer_kept_serialized_reads_back_whole() -> None:
    body = io.BytesIO()
    pq.write_table(pa.table({"power": [1.0, None, 3.0], "device_id": ["a", "a", "b"]}), body)
    footer = pq.read_metadata(pa.BufferReader(body.getvalue()))
    again = footer_of(footer_bytes(footer))
    assert again.equals(footer)
    assert again.row_group(0).column(0).statistics.null_count == 1
