"""Which reconciled device-days changed in InfluxDB since: a pure comparison of counts."""

from datetime import date

from export_pipeline.engine.reconciliation import LateData, late_data

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
