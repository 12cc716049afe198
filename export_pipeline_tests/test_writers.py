"""Which multipart uploads are abandoned: a pure rule on their start times."""

from datetime import UTC, datetime, timedelta

from export_pipeline.writers import abandoned

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def test_only_uploads_started_before_the_cutoff_are_abandoned() -> None:
    old = {"Key": "a", "UploadId": "1", "Initiated": NOW - timedelta(hours=2)}
    live = {"Key": "a", "UploadId": "2", "Initiated": NOW - timedelta(seconds=5)}
    assert abandoned([old, live], NOW - timedelta(minutes=10)) == [old]
    assert abandoned([old, live], NOW - timedelta(hours=3)) == []
