"""`telemetry_export` and `register_devices` run by Dagster on PostgreSQL storage and its CLI."""

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from export_pipeline.defs.devices import register_devices
from export_pipeline.defs.resources import build_resources
from export_pipeline_tests.conftest import CLI_CWD, Stack, telemetry_export
from export_pipeline_tests.services import dagster_command, free_port, point
from export_pipeline_tests.test_export import at


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def test_materializing_a_partition_exports_it_and_records_row_count_and_uri(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    stack.write([point(at(12, m), device, {"voltage": 230.0}) for m in range(0, 15, 2)])
    instance.add_dynamic_partitions("devices", [device])

    result = materialize(
        [telemetry_export],
        partition_key=f"2026-02-07|{device}",
        resources=build_resources(stack.settings()),
        instance=instance,
    )

    assert result.success
    folder = f"telemetry/device_id={device}/date=2026/02/07/"
    assert sorted(stack.objects()) == [
        folder + name
        for name in ("export_120000.parquet", "export_120500.parquet", "export_121000.parquet")
    ]
    # The materialization is recorded in PostgreSQL with its metadata.
    event = instance.get_latest_materialization_event(telemetry_export.key)
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert event.asset_materialization.partition == f"2026-02-07|{device}"
    assert metadata["dagster/row_count"].value == 8
    assert metadata["dagster/uri"].value == f"s3://{stack.bucket}/{folder}"
    assert metadata["files_written"].value == 3
    assert metadata["first_timestamp"].value == "2026-02-07T12:00:00+00:00"


def test_an_unreachable_influxdb_fails_the_run_naming_the_setting(
    stack: Stack, instance: DagsterInstance
) -> None:
    device = new_device()
    instance.add_dynamic_partitions("devices", [device])
    url = f"http://127.0.0.1:{free_port()}"
    result = materialize(
        [telemetry_export],
        partition_key=f"2026-02-07|{device}",
        resources=build_resources(stack.settings(INFLUXDB_URL=url)),
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None and f"INFLUXDB_URL={url} is unreachable" in failure.to_string()
    assert stack.objects() == {}


def test_register_devices_adds_the_ids_in_device_ids(
    stack: Stack, instance: DagsterInstance
) -> None:
    first, second = new_device(), new_device()
    settings = stack.settings(DEVICE_IDS=f"{first},{second}")
    result = register_devices.execute_in_process(
        resources=build_resources(settings), instance=instance
    )
    assert result.success
    assert {first, second} <= set(instance.get_dynamic_partitions("devices"))


def test_register_devices_refuses_unsafe_ids_and_registers_none(
    stack: Stack, instance: DagsterInstance
) -> None:
    good = new_device()
    settings = stack.settings(DEVICE_IDS=f"{good},../etc,a/b,x|y")
    result = register_devices.execute_in_process(
        resources=build_resources(settings), instance=instance, raise_on_error=False
    )
    assert not result.success
    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    for culprit in ("'../etc'", "'a/b'", "'x|y'"):
        assert culprit in message
    assert good not in instance.get_dynamic_partitions("devices")


def dagster_cli(
    args: list[str], env: dict[str, str], home: Path, cwd: Path = CLI_CWD
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
    return subprocess.run(
        dagster_command("dagster", *args),
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_registers_a_device_and_materializes_its_day(
    stack: Stack, dagster_home: Path
) -> None:
    device = new_device()
    stack.write([point(at(0), device, {"voltage": 1.0}), point(at(23, 59), device, {"power": 2})])
    env = stack.env(DEVICE_IDS=device)

    registered = dagster_cli(["job", "execute", "-j", "register_devices"], env, dagster_home)
    assert registered.returncode == 0, registered.stderr[-2000:]
    exported = dagster_cli(
        [
            "asset",
            "materialize",
            "--select",
            "telemetry_export",
            "--partition",
            f"2026-02-07|{device}",
        ],
        env,
        dagster_home,
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    folder = f"telemetry/device_id={device}/date=2026/02/07/"
    assert sorted(stack.objects()) == [
        folder + "export_000000.parquet",
        folder + "export_235500.parquet",
    ]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EXPORT_FORMAT", "xml", "EXPORT_FORMAT='xml' is not one of parquet, csv"),
        ("EXPORT_INTERVAL_SECONDS", "7", "EXPORT_INTERVAL_SECONDS=7 does not divide a day"),
    ],
)
def test_the_cli_refuses_bad_configuration_naming_the_setting(
    stack: Stack, dagster_home: Path, name: str, value: str, message: str
) -> None:
    result = dagster_cli(
        ["asset", "materialize", "--select", "telemetry_export", "--partition", "2026-02-07|D1"],
        stack.env(**{name: value}),
        dagster_home,
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_the_cli_takes_a_dotenv_from_its_working_directory_so_tests_start_it_elsewhere(
    stack: Stack, dagster_home: Path, tmp_path: Path
) -> None:
    """Dagster's CLI loads `.env` from its working directory over the environment it is given,
    so started in a checkout where `scripts/run` wrote one, a test or a benchmark would export
    with the demo's settings. They start it in an empty folder instead."""
    device = new_device()
    stack.write([point(at(12), device, {"voltage": 1.0})])
    env = stack.env(DEVICE_IDS=device, EXPORT_RETRIES="0")
    assert (
        dagster_cli(["job", "execute", "-j", "register_devices"], env, dagster_home).returncode == 0
    )
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".env").write_text("S3_BUCKET=the-demos-bucket\n")
    materialize = ["asset", "materialize", "--select", "telemetry_export"]
    materialize += ["--partition", f"2026-02-07|{device}"]

    misled = dagster_cli(materialize, env, dagster_home, cwd=checkout)
    assert misled.returncode != 0
    assert "S3_BUCKET='the-demos-bucket' does not exist" in misled.stdout + misled.stderr
    assert not (CLI_CWD / ".env").exists()
    exported = dagster_cli(materialize, env, dagster_home)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert list(stack.objects()) == [
        f"telemetry/device_id={device}/date=2026/02/07/export_120000.parquet"
    ]


def test_a_run_with_a_wrong_s3_secret_fails_naming_s3_and_the_key_id_never_the_secret(
    stack: Stack, dagster_home: Path
) -> None:
    device = new_device()
    stack.write([point(at(12), device, {"voltage": 1.0})])
    env = stack.env(DEVICE_IDS=device, EXPORT_RETRIES="0")
    assert (
        dagster_cli(["job", "execute", "-j", "register_devices"], env, dagster_home).returncode == 0
    )
    materialize = ["asset", "materialize", "--select", "telemetry_export"]
    materialize += ["--partition", f"2026-02-07|{device}"]
    refused = dagster_cli(
        materialize, {**env, "AWS_SECRET_ACCESS_KEY": "a-wrong-secret"}, dagster_home
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert f"S3 at S3_ENDPOINT_URL={stack.s3_url} (access key id testing-key-id)" in output
    assert "SignatureDoesNotMatch" in output
    assert "a-wrong-secret" not in output
    assert stack.objects() == {}
