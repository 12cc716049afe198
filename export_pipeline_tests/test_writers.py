"""Which multipart uploads are abandoned: a pure rule on their start times."""

from datetime import UTC, datetime, timedelta

from export_pipeline.engine.store import abandoned

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def test_only_uploads_started_before_the_cutoff_are_abandoned() -> None:
    old = {"Key": "t/device_id=a/x", "UploadId": "1", "Initiated": NOW - timedelta(hours=2)}
    young = {"Key": "t/device_id=a/x", "UploadId": "2", "Initiated": NOW - timedelta(seconds=5)}
    assert abandoned([old, young], NOW - timedelta(minutes=10), []) == [old]
    assert abandoned([old, young], NOW - timedelta(hours=3), []) == []


def test_uploads_of_devices_being_exported_are_left_alone_whatever_their_age() -> None:
    mine = {"Key": "t/device_id=a/x", "UploadId": "1", "Initiated": NOW - timedelta(days=2)}
    other = {"Key": "t/device_id=ab/x", "UploadId": "2", "Initiated": NOW - timedelta(days=2)}
    assert abandoned([mine, other], NOW, ["t/device_id=a/"]) == [other]
