import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from export_pipeline.engine.influx import InfluxError, InfluxUnavailable
from export_pipeline.engine.retries import (
    TRANSIENT_S3_CODES,
    backoff_delays,
    is_transient,
    with_retries,
)


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
    attempts: list[int] = []
    slept: list[float] = []

    def down() -> None:
        attempts.append(1)
        raise InfluxUnavailable(f"down at attempt {len(attempts)}")

    with pytest.raises(InfluxUnavailable, match=r"^down at attempt 3$"):
        with_retries(down, retries=2, sleep=slept.append)
    assert len(attempts) == 3  # the first attempt and two retries
    assert len(slept) == 2  # a pause before each retry, none after the last attempt


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    """Retry n waits uniformly in [0, min(cap, base * 2^n)]: over many draws each delay stays
    under its bound, comes close to it and close to zero, and averages half of it."""
    samples = [backoff_delays(6, base=0.5, cap=10) for _ in range(2_000)]
    bounds = [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]  # doubling from 0.5 s, then capped at 10 s
    for n, bound in enumerate(bounds):
        delays = [sample[n] for sample in samples]
        # A miss of any of these by chance has a probability below 1e-90.
        assert all(0 <= delay <= bound for delay in delays)
        assert max(delays) > 0.95 * bound
        assert min(delays) < 0.05 * bound
        assert 0.4 * bound < sum(delays) / len(delays) < 0.6 * bound


def test_s3_connection_errors_are_transient() -> None:
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))


@pytest.mark.parametrize("code", sorted(TRANSIENT_S3_CODES))
def test_s3_5xx_and_throttling_are_transient(code: str) -> None:
    assert is_transient(ClientError({"Error": {"Code": code}}, "PutObject"))


@pytest.mark.parametrize("code", ["400", "403", "404", "NoSuchKey", "NoSuchBucket", "AccessDenied"])
def test_s3_client_errors_are_not_transient(code: str) -> None:
    assert not is_transient(ClientError({"Error": {"Code": code}}, "PutObject"))


def test_an_upload_failure_wrapping_a_slowdown_is_transient() -> None:
    from boto3.exceptions import S3UploadFailedError

    try:
        try:
            raise ClientError({"Error": {"Code": "SlowDown"}}, "UploadPart")
        except ClientError as inner:
            raise S3UploadFailedError("Failed to upload") from inner
    except S3UploadFailedError as wrapped:
        assert is_transient(wrapped)
