"""Retrying transient failures with exponential backoff and full jitter.

Only failures that a later attempt can cure are retried (connection refused, timeouts, 5xx);
configuration and authentication errors fail at once, with the message that names the setting.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

from export_pipeline.engine.influx import InfluxUnavailable
from export_pipeline.engine.store import is_transient_store_error

T = TypeVar("T")
TRANSIENT_S3_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "SlowDown",
    "RequestTimeout",
    "ServiceUnavailable",
}


def is_transient(error: BaseException | None) -> bool:
    """True for failures a later attempt can cure (InfluxDB unreachable, S3 through obstore or,
    for the sweep's multipart listing, boto3), also when wrapped."""
    while error is not None:
        if isinstance(error, InfluxUnavailable | ConnectionError | HTTPClientError):
            return True
        if is_transient_store_error(error):
            return True
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in TRANSIENT_S3_CODES:
                return True
        error = error.__cause__ or error.__context__
    return False


def backoff_delays(attempts: int, *, base: float = 0.5, cap: float = 10.0) -> list[float]:
    """Full-jitter delays before each retry: uniform in [0, min(cap, base * 2^n)]."""
    return [random.uniform(0, min(cap, base * 2**n)) for n in range(attempts)]


def with_retries(
    action: Callable[[], T],
    retries: int,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `action`, retrying up to `retries` times while it fails transiently."""
    for delay in backoff_delays(retries):
        try:
            return action()
        except Exception as error:
            if not is_transient(error):
                raise
            if on_retry:
                on_retry(error, delay)
            sleep(delay)
    return action()
