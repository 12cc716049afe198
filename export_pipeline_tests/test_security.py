"""The deployment keeps Dagster's UI (which has no login) on the host unless told otherwise, and
the credentials of docs/security.md are least privilege.

Its S3 policy is proven two ways: the exporter's own code does all its S3 work with
only that policy, against a moto server that enforces IAM; and the S3 calls it made (read from
that server's request log), mapped to the IAM actions AWS authorises them with, are exactly the
actions the policy grants. moto stays for this alone: evaluating AWS IAM policy documents is
what only an AWS emulator does (SeaweedFS, the tests' S3 server elsewhere, grants actions per
bucket, not by policy).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.exceptions import ClientError
from dagster_webserver.cli import cli as webserver_cli

from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.engine.dataset import ExportReport
from export_pipeline.engine.day_files import DayFiles
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.influx import InfluxSource
from export_pipeline.engine.layout import device_folder
from export_pipeline.engine.reconciliation import Reconciliation
from export_pipeline.engine.slice_files import Slices
from export_pipeline.engine.store import MULTIPART_THRESHOLD
from export_pipeline.settings import Settings, devices_root
from export_pipeline_tests.compose import (
    COMPOSE,
    ENV_EXAMPLE,
    Env,
    is_loopback,
    published_addresses,
)
from export_pipeline_tests.conftest import REPO
from export_pipeline_tests.services import (
    InfluxServer,
    MotoServer,
    point,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SERVICES: dict[str, Any] = COMPOSE["services"]
WIDENED = {**ENV_EXAMPLE, "PUBLISH_ADDRESS": "0.0.0.0"}
# A .env copied from .env.example, and one copied before PUBLISH_ADDRESS existed.
DEFAULT_ENVS: dict[str, Env] = {
    "env-example": ENV_EXAMPLE,
    "env-without-publish-address": {k: v for k, v in ENV_EXAMPLE.items() if k != "PUBLISH_ADDRESS"},
}


@pytest.mark.parametrize(
    ("port", "env", "address"),
    [
        ("3000", {}, ""),  # a random host port, on every interface
        ("3000:3000", {}, ""),
        (3000, {}, ""),
        ("0.0.0.0:3000:3000", {}, "0.0.0.0"),
        ("127.0.0.1:3000:3000", {}, "127.0.0.1"),
        ("127.0.0.1::3000", {}, "127.0.0.1"),
        ("[::1]:3000:3000/tcp", {}, "::1"),
        ("${ADDRESS:-0.0.0.0}:3000:3000", {}, "0.0.0.0"),
        ("${ADDRESS:-127.0.0.1}:3000:3000", {"ADDRESS": ""}, "127.0.0.1"),
        ("${ADDRESS-127.0.0.1}:3000:3000", {"ADDRESS": ""}, ""),  # set, though empty
        ("${ADDRESS}:3000:3000", {"ADDRESS": "10.0.0.5"}, "10.0.0.5"),
        ({"target": 3000, "published": 3000}, {}, ""),
        ({"target": 3000, "published": 3000, "host_ip": "${ADDRESS:-127.0.0.1}"}, {}, "127.0.0.1"),
    ],
)
def test_a_published_port_is_read_as_compose_reads_it(port: object, env: Env, address: str) -> None:
    assert published_addresses({"ports": [port]}, env) == [address]


def reachable_from_other_machines(env: Env) -> dict[str, list[str]]:
    """Each service's published addresses that are not loopback ("" is every interface)."""
    found = {}
    for name, service in SERVICES.items():
        wide = [
            address for address in published_addresses(service, env) if not is_loopback(address)
        ]
        if wide:
            found[name] = wide
    return found


@pytest.mark.parametrize("env", DEFAULT_ENVS.values(), ids=DEFAULT_ENVS.keys())
def test_no_service_publishes_a_port_beyond_this_host_by_default(env: Env) -> None:
    # Every service, whatever its profile: `--profile operator` and `--profile inspect` too.
    assert reachable_from_other_machines(env) == {}
    assert [name for name, s in SERVICES.items() if s.get("network_mode") == "host"] == []


def test_publish_address_opens_the_read_only_ui_and_the_health_service_and_nothing_else() -> None:
    assert reachable_from_other_machines(WIDENED) == {
        "webserver": ["0.0.0.0"],
        "health": ["0.0.0.0"],
    }


def test_postgresql_and_the_code_server_are_never_published() -> None:
    publishing = {name for name, service in SERVICES.items() if service.get("ports")}
    assert publishing == {"webserver", "webserver-operator", "health", "inspect"}
    forwarded = " ".join(SERVICES["inspect"]["command"])
    assert "postgres" not in forwarded and "code-server" not in forwarded
    assert SERVICES["inspect"]["profiles"] == ["inspect"]


def test_everyone_gets_the_read_only_ui_and_operators_the_full_one_on_this_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)  # the commands name the workspace file relative to it

    def read_only(service: str) -> bool:
        command = SERVICES[service]["command"]
        assert command[:3] == ["python", "-m", "export_pipeline.ui"]  # same-origin only
        return bool(webserver_cli.make_context("ui", command[3:]).params["read_only"])

    assert read_only("webserver")
    assert "profiles" not in SERVICES["webserver"]
    assert not read_only("webserver-operator")
    assert SERVICES["webserver-operator"]["profiles"] == ["operator"]
    assert published_addresses(SERVICES["webserver-operator"], WIDENED) == ["127.0.0.1"]


# The credentials of docs/security.md. --------------------------------------------------------

SECURITY = (REPO / "docs" / "security.md").read_text()


def security_block(language: str) -> str:
    """The one ```language block of docs/security.md."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", SECURITY, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"docs/security.md should hold one {language} block"
    return str(blocks[0])


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


POLICY: dict[str, Any] = json.loads(security_block("json"))
STATEMENTS: list[dict[str, Any]] = POLICY["Statement"]
BUCKET = str(ENV_EXAMPLE["S3_BUCKET"])
# S3_DAILY_PREFIX's default until the daily dataset puts it in .env.example.
PREFIXES = [str(ENV_EXAMPLE["S3_PREFIX"]), ENV_EXAMPLE.get("S3_DAILY_PREFIX") or "telemetry_daily"]

# The IAM action AWS authorises each S3 call of the project with (the Service Authorization
# Reference for Amazon S3). A call missing here is a call the policy was not checked for.
IAM_ACTION = {
    "ListObjectsV2": "s3:ListBucket",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "DeleteObjects": "s3:DeleteObject",  # checked for each key
}


# werkzeug colours the request of a non-200 answer: "\x1b[35m\x1b[1mDELETE /b/k?uploadId=u ...
REQUEST = re.compile(
    r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|DELETE|HEAD) /([^/? ]+)(/[^? ]*)?(?:\?(\S*))? HTTP/'
)


def s3_operations(log: str) -> set[str]:
    """The S3 operations of the requests in an access log, named as AWS names them (path-style
    requests: the bucket first)."""
    found = set()
    for method, _bucket, key, query in REQUEST.findall(log):
        params = {part.split("=", 1)[0] for part in query.split("&") if part}
        on_object = bool(key.strip("/"))
        if method == "GET":
            name = "GetObject" if on_object else "ListMultipartUploads"
            if not on_object and "uploads" not in params:
                name = "ListObjectsV2" if "list-type" in params else "ListObjects"
        elif method == "PUT":
            name = "UploadPart" if "uploadId" in params else "PutObject"
        elif method == "POST":
            name = "DeleteObjects" if "delete" in params else "CompleteMultipartUpload"
            if "uploads" in params:
                name = "CreateMultipartUpload"
        elif method == "DELETE":
            name = "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
        else:
            name = "HeadObject" if on_object else "HeadBucket"
        found.add(name)
    return found


def as_moto_enforces_it(policy: dict[str, Any]) -> dict[str, Any]:
    """`policy` with moto's departures from AWS made up for, so moto lets through what AWS would.

    moto 5.2 (moto/s3/responses.py) authorises
    - HeadBucket as "s3:HeadBucket" (ACTION_MAP["BUCKET"]["HEAD"]), an action IAM does not have:
      AWS asks for s3:ListBucket. Granted wherever s3:ListBucket is.
    - DeleteObjects as s3:DeleteObject on the bucket's ARN (`_bucket_response_post`), answering
      AccessDenied for every key otherwise: AWS checks each key's ARN. Granted on the buckets
      whose keys s3:DeleteObject is granted on, so under moto a batch delete reaches any key of
      the bucket; that deletes are held to the prefixes is shown with single-key DeleteObject.
    What moto does not evaluate at all for S3 is a Condition: its evaluator gets no request
    context (iam/access_control.py `check_action_permitted`), finds no value for any key and so
    lets every condition pass. The policy has none (see the test below).
    """
    added = []
    for statement in policy["Statement"]:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        if "s3:ListBucket" in actions:
            added.append({"Effect": "Allow", "Action": "s3:HeadBucket", "Resource": resources})
        if "s3:DeleteObject" in actions:
            buckets = sorted({resource.split("/", 1)[0] for resource in resources})
            added.append({"Effect": "Allow", "Action": "s3:DeleteObject", "Resource": buckets})
    return {**policy, "Statement": [*policy["Statement"], *added]}


def test_the_readme_s3_policy_names_the_exports_bucket_and_the_two_dataset_prefixes_only() -> None:
    resources = {resource for s in STATEMENTS for resource in as_list(s["Resource"])}
    assert resources == {f"arn:aws:s3:::{BUCKET}"} | {
        f"arn:aws:s3:::{BUCKET}/{prefix}/*" for prefix in PREFIXES
    }
    # Only plain grants: a Condition would go unchecked by moto (and an s3:prefix one would
    # refuse HeadBucket, which asks for s3:ListBucket without a prefix).
    assert all(set(s) <= {"Sid", "Effect", "Action", "Resource"} for s in STATEMENTS)
    assert {s["Effect"] for s in STATEMENTS} == {"Allow"}


def iam_client(url: str, key: Mapping[str, str]) -> Any:
    return boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )


@dataclass(frozen=True)
class IamS3:
    """A moto S3 server of its own that checks every request against the caller's IAM policies;
    the admin is allowed everything, the exporter holds the documented policy alone."""

    url: str
    admin_key: Mapping[str, str]
    exporter_key: Mapping[str, str]
    log: Path  # moto's request log: a line per request, `"METHOD /bucket/key?query HTTP/1.1"`

    def bucket(self) -> ExportBucketResource:
        """The exporter's bucket as the pipeline configures it, with the exporter's keys."""
        return ExportBucketResource(
            bucket=BUCKET,
            prefix=PREFIXES[0],
            daily_prefix=PREFIXES[1],
            region_name="us-east-1",
            endpoint_url=self.url,
            aws_access_key_id=self.exporter_key["AccessKeyId"],
            aws_secret_access_key=self.exporter_key["SecretAccessKey"],
        )

    def s3(self, key: Mapping[str, str]) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )

    @property
    def admin(self) -> S3Client:
        return self.s3(self.admin_key)

    @property
    def exporter(self) -> S3Client:
        return self.s3(self.exporter_key)


OTHER_BUCKET = "someone-elses-bucket"
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3]:
    # moto serves its first INITIAL_NO_AUTH_ACTION_COUNT S3 and IAM requests unchecked (its
    # `/moto-api/` start-up probe is not one of them), then authenticates and authorises each.
    # The three unchecked ones make an admin; everything after is signed.
    server = MotoServer(
        tmp_path_factory.mktemp("moto-iam"), env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    )
    server.start()
    try:
        unchecked = iam_client(server.url, {"AccessKeyId": "any", "SecretAccessKey": "any"})
        unchecked.create_user(UserName="admin")
        unchecked.put_user_policy(
            UserName="admin", PolicyName="everything", PolicyDocument=json.dumps(ALLOW_ALL)
        )
        admin_key = unchecked.create_access_key(UserName="admin")["AccessKey"]
        iam = iam_client(server.url, admin_key)
        iam.create_user(UserName="export-pipeline")
        iam.put_user_policy(
            UserName="export-pipeline",
            PolicyName="readme",
            PolicyDocument=json.dumps(as_moto_enforces_it(POLICY)),
        )
        exporter_key = iam.create_access_key(UserName="export-pipeline")["AccessKey"]
        s3 = IamS3(server.url, admin_key, exporter_key, server.root / "moto.log")
        for bucket in (BUCKET, OTHER_BUCKET):
            s3.admin.create_bucket(Bucket=bucket)
        s3.admin.put_object(Bucket=OTHER_BUCKET, Key="secret.txt", Body=b"not yours")
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):  # it does check
            s3.s3({"AccessKeyId": "nobody", "SecretAccessKey": "x"}).list_buckets()
        yield s3
    finally:
        server.stop()


DAY = date(2026, 2, 7)
DEVICE = "D1"


@dataclass
class ExporterRun:
    """What the exporter did in `exercise_every_s3_operation`."""

    reports: list[ExportReport] = field(default_factory=list)
    reconciliations: list[Reconciliation] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    keys_left: list[str] = field(default_factory=list)


def exercise_every_s3_operation(
    bucket: ExportBucketResource, admin: S3Client, influx: InfluxServer, workdir: Path
) -> ExporterRun:
    """Every kind of S3 call the project makes, through its own code (ObjectStore on the data
    path, MultipartUploads for the sweep; the health check is `ObjectStore.check`): the check;
    a device-day's slices exported and reconciled (Parquet, then CSV, which replaces the Parquet
    slices), its day file written and reconciled (a ranged GET of its footer);
    then per prefix an object above the multipart threshold uploaded and deleted, and an upload
    abandoned in a device folder (started by `admin`) aborted by the sweep's routine."""
    run = ExporterRun()
    store = bucket.store()
    database = f"t{uuid.uuid4().hex[:12]}"
    influx.create_database(database)
    midnight = int(datetime(2026, 2, 7, tzinfo=UTC).timestamp()) * 10**9
    influx.write(
        database,
        [point(midnight + hour * 3600 * 10**9, DEVICE, {"voltage": 230.0}) for hour in (1, 2, 3)],
    )
    big = workdir / "slice.parquet"
    big.write_bytes(os.urandom(MULTIPART_THRESHOLD + 1024 * 1024))

    store.check()
    for fmt in ("parquet", "csv"):
        settings = Settings.from_env(
            {
                "INFLUXDB_URL": influx.url,
                "INFLUXDB_BUCKET": database,
                "S3_BUCKET": store.bucket,
                "S3_PREFIX": PREFIXES[0],
                "S3_DAILY_PREFIX": PREFIXES[1],
                "EXPORT_INTERVAL_SECONDS": "300",
                "EXPORT_FORMAT": fmt,
            }
        )
        with InfluxSource(settings.influx) as source:
            dataset = Slices(source, store, PREFIXES[0], settings.export)
            report = dataset.export(DEVICE, DayRange.whole(DAY))
            run.reports.append(report)
            run.reconciliations.append(dataset.reconcile(DEVICE, DAY, report.totals))
    with InfluxSource(settings.influx) as source:
        days = DayFiles(source, store, PREFIXES[1], settings.export.batch_size, workdir)
        report = days.export(DEVICE, DayRange.whole(DAY))
        run.reports.append(report)
        run.reconciliations.append(days.reconcile(DEVICE, DAY, report.totals))
    layout = settings.export.layout
    for prefix in PREFIXES:
        next_day = device_folder(
            prefix, device_id=DEVICE, day=DAY + timedelta(days=1), layout=layout
        )
        store.upload(big, key=f"{next_day}export_000000.parquet", fmt="parquet")
        store.delete([f"{next_day}export_000000.parquet"])
        folder = device_folder(prefix, device_id="D2", day=DAY, layout=layout)
        abandoned = f"{folder}export_000000.parquet"
        admin.create_multipart_upload(Bucket=store.bucket, Key=abandoned)
        later = datetime.now(UTC) + timedelta(minutes=1)
        run.aborted += bucket.multipart_uploads().abort_abandoned(devices_root(prefix), later)
    listing = admin.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    run.keys_left = sorted(item["Key"] for item in listing)
    return run


def test_the_exporter_does_all_its_s3_work_with_only_the_readme_policy(
    iam_s3: IamS3, influx_server: InfluxServer, tmp_path: Path
) -> None:
    run = exercise_every_s3_operation(iam_s3.bucket(), iam_s3.admin, influx_server, tmp_path)

    assert [report.rows for report in run.reports] == [3, 3, 3]
    assert [check.passed for check in run.reconciliations] == [True, True, True]
    assert run.aborted == [
        f"{prefix}/device_id=D2/date=2026/02/07/export_000000.parquet" for prefix in PREFIXES
    ]
    csv_slices, day_file = run.reports[1].files_written, run.reports[2].files_written
    written = sorted(uri.removeprefix(f"s3://{BUCKET}/") for uri in csv_slices + day_file)
    assert len(written) == 4
    assert run.keys_left == written  # the Parquet slices were replaced, the big objects deleted


def test_the_readme_policy_grants_exactly_the_iam_actions_the_exporter_needs(
    iam_s3: IamS3, influx_server: InfluxServer, tmp_path: Path
) -> None:
    log = iam_s3.log.read_text(errors="replace")
    exercise_every_s3_operation(iam_s3.bucket(), iam_s3.admin, influx_server, tmp_path)
    requests = iam_s3.log.read_text(errors="replace")[len(log) :]
    # The admin's two kinds of call in the exercise (starting the abandoned uploads, listing
    # what is left) are kinds the exporter makes too.
    exporter = s3_operations(requests)

    # Every kind of S3 call the project makes was made, and no other.
    assert exporter == set(IAM_ACTION)
    needed = {IAM_ACTION[operation] for operation in exporter}
    granted = {action for s in STATEMENTS for action in as_list(s["Action"])}
    assert needed - granted == set(), "missing from the policy"
    assert granted - needed == set(), "granted by the policy but never needed"


def test_s3_requests_are_named_as_aws_names_their_operations() -> None:
    log = "\n".join(
        f'127.0.0.1 - - [06/Dec/2026 10:00:00] "{request} HTTP/1.1" 200 -'
        for request in (
            "GET /b?list-type=2&prefix=t%2F&delimiter=%2F",
            "GET /b?uploads&prefix=t%2F",
            "GET /b/t/k.parquet",
            "PUT /b/t/k.parquet",
            "PUT /b/t/k.parquet?partNumber=1&uploadId=u",
            "POST /b/t/k.parquet?uploads",
            "POST /b/t/k.parquet?uploadId=u",
            "POST /b?delete",
            "\x1b[35m\x1b[1mDELETE /b/t/k.parquet?uploadId=u",
        )
    )
    assert s3_operations(log) == set(IAM_ACTION)


@pytest.mark.parametrize(
    "call",
    [
        lambda s3: s3.put_object(Bucket=BUCKET, Key="elsewhere/x.parquet", Body=b"x"),
        lambda s3: s3.put_object(Bucket=BUCKET, Key="telemetry_archive/x.parquet", Body=b"x"),
        lambda s3: s3.get_object(Bucket=OTHER_BUCKET, Key="secret.txt"),
        lambda s3: s3.list_objects_v2(Bucket=OTHER_BUCKET),
        lambda s3: s3.delete_object(Bucket=BUCKET, Key="elsewhere/x.parquet"),
        lambda s3: s3.delete_bucket(Bucket=BUCKET),
        lambda s3: s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(ALLOW_ALL)),
        lambda s3: s3.create_bucket(Bucket="a-bucket-of-its-own"),
    ],
    ids=[
        "PutObject-outside-the-prefixes",
        "PutObject-under-a-prefix-that-only-starts-alike",
        "GetObject-in-another-bucket",
        "ListObjectsV2-of-another-bucket",
        "DeleteObject-outside-the-prefixes",
        "DeleteBucket",
        "PutBucketPolicy",
        "CreateBucket",
    ],
)
def test_the_readme_policy_refuses_what_the_exporter_never_does(
    iam_s3: IamS3, call: Callable[[Any], object]
) -> None:
    with pytest.raises(ClientError) as refused:
        call(iam_s3.exporter)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
