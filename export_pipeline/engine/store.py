"""Export files (Parquet or CSV) written to local disk (or to memory, for a single slice), then
uploaded whole to S3.

A file is finished before it is uploaded, in one PutObject (or a multipart upload that is
aborted on failure), so an object in S3 is always complete: readers never see a partial file, and
a failed upload leaves nothing behind (or the previous object, when it replaces one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
import obstore.exceptions

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from obstore.store import S3Store

# Files of 8 MiB and more go up in parts of 8 MiB, four at a time: a day file of a busy device
# (tens of MB) in parallel parts, a slice in one PUT.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
MULTIPART_CONCURRENCY = 4
CHECK_PREFIX = ".export-pipeline-check/"
CONTENT_TYPES = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv; charset=utf-8"}


def abandoned(
    uploads: Iterable[Mapping[str, Any]], started_before: datetime, live_folders: Iterable[str]
) -> list[Mapping[str, Any]]:
    """The multipart uploads started before `started_before` outside `live_folders` (those of
    devices a run is exporting now); the others may still be in progress."""
    live = tuple(live_folders)
    return [
        upload
        for upload in uploads
        if upload["Initiated"] < started_before and not upload["Key"].startswith(live)
    ]


class StoreError(RuntimeError):
    """The S3 bucket cannot be used; the message names the setting to look at."""


# What S3 answered, in obstore's error text: "... status code: 503 Service Unavailable: <?xml
# ...<Code>SlowDown</Code>". No status at all means the request never got an answer (refused,
# reset, timed out).
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")


def s3_answer(error: BaseException) -> tuple[int | None, str]:
    """The HTTP status and S3 error code in an obstore error (None and "" where S3 never
    answered)."""
    text = str(error)
    status, code = _STATUS.search(text), _CODE.search(text)
    return (int(status.group(1)) if status else None), (code.group(1) if code else "")


def is_transient_store_error(error: BaseException) -> bool:
    """True for an obstore error a later attempt can cure: no answer (connection refused, reset
    or timed out), a 5xx, 408 or 429. obstore's own retries are off (one retry policy,
    `retries.with_retries`), so every such failure reaches the caller."""
    if not isinstance(error, obstore.exceptions.BaseError) or isinstance(
        error, FileNotFoundError | obstore.exceptions.PermissionDeniedError
    ):
        return False
    if isinstance(error, obstore.exceptions.UnauthenticatedError):
        return False
    status, _ = s3_answer(error)
    return status is None or status >= 500 or status in (408, 429)


def first_line(error: BaseException) -> str:
    """obstore's message without its multi-line debug dump."""
    return str(error).split("\n", 1)[0].strip()


class ObjectStore:
    """The few S3 operations an export needs, on one bucket, through obstore (Rust's
    object_store): a PUT costs a tenth of boto3's CPU (bench P12), and the GIL is released
    while requests are in flight, so a run's upload threads overlap.

    `endpoint` and `key_id` only name the target in errors; the secret is never in one.
    """

    def __init__(
        self, store: S3Store, bucket: str, *, endpoint: str | None, key_id: str | None
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.endpoint = endpoint
        self.key_id = key_id

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _where(self) -> str:
        endpoint = f"S3_ENDPOINT_URL={self.endpoint}" if self.endpoint else "AWS S3"
        key_id = self.key_id or "from the default credential chain"
        return f"S3 at {endpoint} (access key id {key_id})"

    def check(self) -> None:
        """Fail early, naming the bucket, the endpoint and the key id, when the bucket is
        missing, out of reach or refuses these credentials; transient failures stay retryable."""
        try:
            # One ListObjectsV2 of a prefix nothing is written under: HeadBucket's answer.
            next(iter(obstore.list(self.store, prefix=CHECK_PREFIX, chunk_size=1)), None)
        except obstore.exceptions.BaseError as error:
            status, code = s3_answer(error)
            if status is None:  # still retried: `retries.is_transient` reads the cause
                raise StoreError(f"{self._where()} is unreachable: {first_line(error)}") from error
            if is_transient_store_error(error):
                raise
            if code == "NoSuchBucket" or status == 404:
                raise StoreError(
                    f"S3_BUCKET={self.bucket!r} does not exist on {self._where()}"
                ) from error
            if status in (401, 403):
                raise StoreError(
                    f"{self._where()} refused S3_BUCKET={self.bucket!r} ({code or status}): "
                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and the key's rights on "
                    "the bucket"
                ) from error
            raise StoreError(
                f"S3_BUCKET={self.bucket!r} cannot be used on {self._where()}: {first_line(error)}"
            ) from error

    def list_keys(self, prefix: str) -> dict[str, int]:
        """Keys directly under `prefix`, with their sizes."""
        listing = obstore.list_with_delimiter(self.store, prefix=prefix)
        # obstore takes the prefix as a folder: keys under "a/b/" are listed for "a/b".
        return {item["path"]: item["size"] for item in listing["objects"]}

    def list_all(self, prefix: str) -> list[Mapping[str, Any]]:
        """Every object under `prefix`, at any depth: path, size and last_modified."""
        return [item for chunk in obstore.list(self.store, prefix=prefix) for item in chunk]

    def copy(self, source: str, target: str) -> None:
        """A copy made inside S3 (CopyObject): no byte passes through this process."""
        obstore.copy(self.store, source, target)

    def read_tail(self, key: str, size: int) -> bytes:
        """The last `size` bytes of an object (all of it if smaller): one ranged GET."""
        answer = obstore.get(self.store, key, options={"range": {"suffix": size}})
        return answer.bytes().to_bytes()

    def put(self, body: bytes, *, key: str, fmt: str) -> None:
        """One PutObject of a small file held in memory: it appears whole or not at all."""
        obstore.put(
            self.store,
            key,
            body,
            attributes={"Content-Type": CONTENT_TYPES[fmt]},
            use_multipart=False,
        )

    def upload(self, path: Path, *, key: str, fmt: str) -> None:
        """One PutObject for a file under the multipart threshold (most slices), a multipart
        upload of MULTIPART_CHUNK parts above it, which obstore aborts when a part fails. Either
        way the object appears whole or not at all."""
        obstore.put(
            self.store,
            key,
            path,
            attributes={"Content-Type": CONTENT_TYPES[fmt]},
            use_multipart=path.stat().st_size >= MULTIPART_THRESHOLD,
            chunk_size=MULTIPART_CHUNK,
            max_concurrency=MULTIPART_CONCURRENCY,
        )

    def delete(self, keys: list[str]) -> None:
        """Batch deletes (DeleteObjects, 1,000 keys a request)."""
        if keys:
            obstore.delete(self.store, keys)


class MultipartUploads:
    """The multipart uploads left open in a bucket, through boto3: obstore aborts an upload
    whose part fails, but has no call to list the ones nobody could abort. A maintenance path
    (the sweep), not the data path."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def abort_abandoned(
        self, prefix: str, started_before: datetime, live_folders: Iterable[str] = ()
    ) -> list[str]:
        """Abort the multipart uploads under `prefix` started before `started_before`, except
        under `live_folders`.

        A multipart upload is aborted on failure, unless the connection died first (the S3
        server or the network went away mid-upload): then the parts stay stored, and billed,
        with no object. The upload's slice is exported again whole, under a new upload.
        """
        aborted = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in abandoned(page.get("Uploads", []), started_before, live_folders):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted.append(upload["Key"])
        return aborted
