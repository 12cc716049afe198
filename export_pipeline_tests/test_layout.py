from datetime import date

import pytest

from export_pipeline.engine.grid import Slice
from export_pipeline.engine.layout import (
    DeviceIdError,
    device_folder,
    slice_key,
    slice_name,
    slice_offset_of,
    validate_device_id,
)

DAY = date(2026, 2, 7)


def test_seed_layout_splits_the_date_into_three_folders() -> None:
    key = slice_key(
        "exports",
        device_id="D1",
        piece=Slice(DAY, 12 * 3600 + 5 * 60, 300),
        layout="seed",
        fmt="parquet",
    )
    assert key == "exports/device_id=D1/date=2026/02/07/export_120500.parquet"


def test_hive_layout_keeps_the_date_in_one_folder() -> None:
    assert (
        device_folder("exports", device_id="D1", day=DAY, layout="hive")
        == "exports/device_id=D1/date=2026-02-07/"
    )


def test_an_empty_prefix_puts_devices_at_the_bucket_root() -> None:
    assert (
        device_folder("", device_id="D1", day=DAY, layout="seed") == "device_id=D1/date=2026/02/07/"
    )


def test_object_names_round_trip_to_slice_offsets() -> None:
    for offset in (0, 59, 3600, 86_399):
        assert slice_offset_of(slice_name(Slice(DAY, offset, 1), "csv")) == offset


@pytest.mark.parametrize(
    "name", ["export_240000.csv", "export_12000.csv", "export_120000.json", "notes.txt", "x"]
)
def test_objects_that_are_not_slice_files_are_not_ours(name: str) -> None:
    assert slice_offset_of(name) is None


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("a\\b", "SeaweedFS reads it as '/'"),
        ("..", "traversal"),
        ("a..b", "traversal"),
        ("a|b", "partition key"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("x" * 129, "129 characters"),
        (" D1", "white space"),
    ],
)
def test_unsafe_device_ids_are_refused_with_the_reason(device_id: str, reason: str) -> None:
    with pytest.raises(DeviceIdError, match=reason):
        validate_device_id(device_id)


@pytest.mark.parametrize(
    "device_id", ["D1", "sensor-7.kitchen", "温度计", "it's", "x" * 128, "a=b"]
)
def test_other_device_ids_are_accepted_verbatim(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    assert f"device_id={device_id}/" in device_folder(
        "p", device_id=device_id, day=DAY, layout="seed"
    )
