import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from export_pipeline.influx import InfluxError, InfluxUnavailable
from export_pipeline.retries import backoff_delays, is_transient, with_retries


def test_transient_failures_are_retried_until_they_pass() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise InfluxUnavailable("InfluxDB at INFLUXDB_URL=x is unreachable")
        return "ok"

    assert with_retries(flaky, retries=4, sleep=slept.append) == "ok"
    assert len(calls) == 3 and len(slept) == 2


def test_configuration_errors_fail_at_once() -> None:
    calls = []

    def wrong_bucket() -> None:
        calls.append(1)
        raise InfluxError("no database INFLUXDB_BUCKET='x'")

    with pytest.raises(InfluxError):
        with_retries(wrong_bucket, retries=4, sleep=lambda _: None)
    assert calls == [1]


def test_retries_give_up_with_the_last_error() -> None:
    def down() -> None:
        raise InfluxUnavailable("down")

    with pytest.raises(InfluxUnavailable):
        with_retries(down, retries=2, sleep=lambda _: None)


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    for _ in range(100):
        delays = backoff_delays(6, base=0.5, cap=10)
        assert all(0 <= d <= min(10, 0.5 * 2**n) for n, d in enumerate(delays))


def test_s3_connection_errors_and_5xx_are_transient_but_403_is_not() -> None:
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))
    assert not is_transient(ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject"))


def test_an_upload_failure_wrapping_a_slowdown_is_transient() -> None:
    from boto3.exceptions import S3UploadFailedError

    try:
        try:
            raise ClientError({"Error": {"Code": "SlowDown"}}, "UploadPart")
        except ClientError as inner:
            raise S3UploadFailedError("Failed to upload") from inner
    except S3UploadFailedError as wrapped:
        assert is_transient(wrapped)
