import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from export_pipeline.record.keys import first_window_day
from export_pipeline.settings import (
    DESCRIPTIONS,
    READ_ELSEWHERE,
    SECRETS,
    Settings,
    SettingsError,
    configuration_reference,
    load_env_file,
    variables_read,
)

BASE = {"S3_BUCKET": "exports"}
REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "configuration.md"
REGENERATE = ".venv/bin/python -m export_pipeline.settings > docs/configuration.md"


def env_example() -> str:
    return (REPO / ".env.example").read_text()


def test_defaults_need_only_a_bucket() -> None:
    settings = Settings.from_env(BASE)
    assert settings.export.interval_seconds == 300
    assert settings.export.format == "parquet"
    assert settings.export.layout == "seed"
    assert settings.export.start_date == date(2026, 1, 1)
    assert settings.influx.measurement == "telemetry"
    assert settings.s3.prefix == "telemetry"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EXPORT_FORMAT", "xml", "EXPORT_FORMAT='xml' is not one of parquet, csv"),
        ("EXPORT_INTERVAL_SECONDS", "7", "EXPORT_INTERVAL_SECONDS=7 does not divide a day"),
        ("EXPORT_INTERVAL_SECONDS", "five", "EXPORT_INTERVAL_SECONDS='five' is not a whole number"),
        ("EXPORT_INTERVAL_SECONDS", "0", "EXPORT_INTERVAL_SECONDS=0 must be at least 1"),
        ("EXPORT_BATCH_SIZE", "-1", "EXPORT_BATCH_SIZE=-1 must be at least 1"),
        ("EXPORT_LAYOUT", "flat", "EXPORT_LAYOUT='flat' is not one of seed, hive"),
        ("EXPORT_START_DATE", "2026-13-01", "EXPORT_START_DATE='2026-13-01' is not a date"),
        ("INFLUXDB_URL", "localhost:8086", "INFLUXDB_URL='localhost:8086' is not an http(s) URL"),
        ("S3_ENDPOINT_URL", "ftp://x", "S3_ENDPOINT_URL='ftp://x' is not an http(s) URL"),
        ("S3_BUCKET", "", "S3_BUCKET is not set"),
        ("S3_BUCKET", "Bad_Bucket", "S3_BUCKET='Bad_Bucket' is not a valid bucket name"),
        ("S3_PREFIX", "a/../b", "S3_PREFIX='a/../b'"),
        ("S3_PREFIX", "a\\b", "S3_PREFIX='a\\\\b' has a '"),
        ("INFLUXDB_TIMEOUT_SECONDS", "0", "INFLUXDB_TIMEOUT_SECONDS=0 must be a positive"),
        ("PORT", "70000", "PORT=70000 must be at least 1 and at most 65535"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not one of"),
        ("LOOKBACK_HOURS", "0", "LOOKBACK_HOURS=0 must be at least 1"),
        ("EXPORT_LATENESS_SECONDS", "-5", "EXPORT_LATENESS_SECONDS=-5 must be at least 0"),
        ("EXPORT_CONCURRENCY", "0", "EXPORT_CONCURRENCY=0 must be at least 1"),
        ("CHECKPOINT_DB_PORT", "x", "CHECKPOINT_DB_PORT='x' is not a whole number"),
        ("EXPORT_SWEEP_CRON", "hourly", "EXPORT_SWEEP_CRON='hourly' is not a five-field cron"),
        ("EXPORT_SWEEP_CRON", "0 * * * * *", "EXPORT_SWEEP_CRON='0 * * * * *' is not a five"),
        ("EXPORT_PARTITION_DAYS", "7", "EXPORT_PARTITION_DAYS=7 is shorter than the week"),
        ("EXPORT_PARTITION_DAYS", "-1", "EXPORT_PARTITION_DAYS=-1 must be at least 0"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**BASE, name: value})
    assert message in str(raised.value)


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"EXPORT_FORMAT": "xml", "EXPORT_INTERVAL_SECONDS": "7"})
    for name in ("EXPORT_FORMAT", "EXPORT_INTERVAL_SECONDS", "S3_BUCKET"):
        assert name in str(raised.value)


def test_device_ids_are_split_trimmed_and_deduplicated() -> None:
    settings = Settings.from_env({**BASE, "DEVICE_IDS": " D1, D2 ,,D1"})
    assert settings.export.device_ids == ("D1", "D2")
    assert Settings.from_env({**BASE, "DEVICE_IDS": "*"}).export.device_ids == ()


def test_secrets_never_appear_in_the_settings_repr() -> None:
    settings = Settings.from_env(
        {**BASE, "INFLUXDB_TOKEN": "tok-SECRET-1", "INFLUXDB_PASSWORD": "pw-SECRET-2"}
    )
    assert settings.influx.token == "tok-SECRET-1"
    assert "SECRET" not in repr(settings)


def test_a_dotenv_in_the_working_directory_fills_in_what_the_environment_does_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "environ", {"S3_PREFIX": "from-the-environment"})
    (tmp_path / ".env").write_text("S3_PREFIX=from-the-file\nEXPORT_FORMAT=csv\n")
    monkeypatch.chdir(tmp_path)
    load_env_file()
    assert os.environ == {"S3_PREFIX": "from-the-environment", "EXPORT_FORMAT": "csv"}
    (tmp_path / "below").mkdir()
    monkeypatch.chdir(tmp_path / "below")  # only the working directory's .env is read
    monkeypatch.setattr(os, "environ", {})
    load_env_file()
    assert os.environ == {}


def test_telemetry_exports_partitions_are_a_window_longer_than_what_reads_its_ledger() -> None:
    """EXPORT_PARTITION_DAYS (14), lengthened past slice retention's week after its days and
    the sensor's lookback; 0 is every day since EXPORT_START_DATE."""
    window = {
        (): 14,
        (("EXPORT_PARTITION_DAYS", "8"),): 10,  # the default day of lookback and a week
        (("EXPORT_SLICE_RETENTION_DAYS", "30"),): 38,
        (("LOOKBACK_HOURS", "720"),): 39,
        (("EXPORT_PARTITION_DAYS", "0"), ("EXPORT_SLICE_RETENTION_DAYS", "30")): 0,
    }
    for overrides, days in window.items():
        assert Settings.from_env({**BASE, **dict(overrides)}).export.partition_window_days == days
    export = Settings.from_env(BASE).export
    assert first_window_day(export, date(2026, 12, 1)) == date(2026, 11, 18)
    assert first_window_day(export, date(2026, 1, 10)) == date(2026, 1, 1)  # not before the start
    unbounded = Settings.from_env({**BASE, "EXPORT_PARTITION_DAYS": "0"}).export
    assert first_window_day(unbounded, date(2026, 12, 1)) == date(2026, 1, 1)


# --- The configuration reference, docs/configuration.md -------------------------------------------


def test_docs_configuration_md_is_the_reference_settings_py_renders() -> None:
    assert REFERENCE.read_text() == configuration_reference(), (
        f"docs/configuration.md differs from export_pipeline/settings.py: run `{REGENERATE}`"
    )


def test_the_regeneration_command_prints_the_reference() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "export_pipeline.settings"],
        cwd=REPO,
        env={**os.environ, "INFLUXDB_TOKEN": "tok-FAKESECRET"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == configuration_reference()


def test_every_variable_the_parser_reads_is_described_and_every_description_is_read() -> None:
    read = set(variables_read())
    assert read - set(DESCRIPTIONS) == set(), "read by the parser, missing from DESCRIPTIONS"
    assert set(DESCRIPTIONS) - read == set(), "in DESCRIPTIONS, never read by the parser"
    assert read & set(READ_ELSEWHERE) == set(), "read by the parser, also in READ_ELSEWHERE"
    assert all(description.strip() for description in DESCRIPTIONS.values())
    # What the parser records does not depend on the environment it parses.
    example = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=\"?(.*?)\"?$", env_example(), re.MULTILINE))
    assert Settings.from_env(example).export.interval_seconds == 60  # the example parses
    assert variables_read(example) == variables_read()


def test_the_reference_shows_each_variables_default_and_rule_as_the_parser_applies_them() -> None:
    rules = variables_read()
    assert rules["S3_BUCKET"].default is None  # required
    assert rules["EXPORT_INTERVAL_SECONDS"].default == str(
        Settings.from_env(BASE).export.interval_seconds
    )
    assert rules["INFLUXDB_TIMEOUT_SECONDS"].default == "30"
    assert rules["EXPORT_START_DATE"].default == "2026-01-01"
    assert rules["EXPORT_FORMAT"].accepts == "`parquet` or `csv`"
    assert rules["EXPORT_CONCURRENCY"].accepts == "a whole number, 1 to 64"
    reference = configuration_reference()
    assert "| `S3_BUCKET` | required |" in reference
    assert "| `EXPORT_SWEEP_CRON` | `20 * * * *` |" in reference


def test_every_variable_of_dagster_yaml_env_example_and_compose_is_described() -> None:
    described = set(DESCRIPTIONS) | set(READ_ELSEWHERE)
    dagster_yaml = set(
        re.findall(r"\{env: ([A-Z][A-Z0-9_]*)\}", (REPO / "dagster.yaml").read_text())
    )
    assert {f"CHECKPOINT_DB_{part}" for part in ("HOST", "PORT", "NAME", "USER", "PASSWORD")} == (
        dagster_yaml
    )
    example = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", env_example(), re.MULTILINE))
    compose = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "docker-compose.yml").read_text()))
    for source, names in (
        ("dagster.yaml", dagster_yaml),
        (".env.example", example),
        ("docker-compose.yml", compose),
    ):
        assert names - described == set(), f"{source} reads variables docs/configuration.md omits"


def test_secrets_are_marked_and_no_value_reaches_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert SECRETS - set(DESCRIPTIONS) - set(READ_ELSEWHERE) == set()
    assert {"INFLUXDB_TOKEN", "INFLUXDB_PASSWORD", "CHECKPOINT_DB_PASSWORD"} <= SECRETS
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= SECRETS
    for name in SECRETS:
        monkeypatch.setenv(name, f"{name.lower()}-FAKESECRET")
    reference = configuration_reference()
    assert "FAKESECRET" not in reference
    for name in SECRETS:
        assert f"| `{name}` *secret* |" in reference
    rules = variables_read()
    assert all(rules[name].default == "" for name in SECRETS if name in rules)
