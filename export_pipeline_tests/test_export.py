"""Device-day exports from a real InfluxDB into a real S3 server, read back value by value."""

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export_pipeline.defs.resources import ExportBucketResource
from export_pipeline.engine.dataset import EmptyReadRefused, ExportReport, prefetched
from export_pipeline.engine.files import SMALL_SLICE_ROWS
from export_pipeline.engine.grid import DayRange
from export_pipeline.engine.influx import InfluxError, InfluxSource
from export_pipeline.engine.schema import SCHEMA, SEED_COLUMNS, SOURCE_SCHEMA
from export_pipeline.engine.slice_files import write_slices
from export_pipeline.engine.store import ObjectStore, StoreError
from export_pipeline.settings import S3Settings
from export_pipeline_tests.audit import assert_reconciled
from export_pipeline_tests.conftest import Stack
from export_pipeline_tests.services import free_port, point

DAY = date(2026, 2, 7)  # a Saturday
MIDNIGHT = int(datetime(2026, 2, 7, tzinfo=UTC).timestamp()) * 10**9
NS = 1_000_000_000
FOLDER = "telemetry/device_id=D1/date=2026/02/07/"


def at(hours: int, minutes: int = 0, seconds: int = 0, ns: int = 0) -> int:
    return MIDNIGHT + (hours * 3600 + minutes * 60 + seconds) * NS + ns


def export(stack: Stack, device_id: str = "D1", day: date = DAY, **env: str) -> ExportReport:
    settings = stack.settings(**env)
    return write_slices(
        InfluxSource(settings.influx),
        stack.store(**env),
        prefix=settings.s3.prefix,
        device_id=device_id,
        piece=DayRange.whole(day),
        settings=settings.export,
    )


def folder_rows(stack: Stack, folder: str = FOLDER) -> list[dict[str, object]]:
    tables = [stack.table(key) for key in sorted(stack.objects()) if key.startswith(folder)]
    return pa.concat_tables(tables).to_pylist() if tables else []


def test_every_value_of_the_device_day_lands_in_its_slice_files(stack: Stack) -> None:
    stack.write(
        [
            point(
                at(12, 0), "D1", {"voltage": 230, "current": 0.5, "power": 100, "temperature": 21.5}
            ),
            point(
                at(12, 4, 59, 999_999_000), "D1", {"voltage": 231.25, "current": 2, "power": 1000}
            ),
            point(
                at(12, 5),
                "D1",
                {"voltage": 229, "current": 0.0, "power": 3},
                device_type="compressor",
                location="roof",
            ),
            point(at(23, 59, 59), "D1", {"temperature": -4.5}),
            # Outside the device-day: the day before, the day after, another device.
            point(at(0) - 1, "D1", {"voltage": 1}),
            point(at(24), "D1", {"voltage": 2}),
            point(at(12, 1), "D2", {"voltage": 3}),
        ]
    )
    report = export(stack)

    assert sorted(stack.objects()) == [
        FOLDER + "export_120000.parquet",
        FOLDER + "export_120500.parquet",
        FOLDER + "export_235500.parquet",
    ]
    assert report.rows == 4
    assert report.folder_uri == f"s3://{stack.bucket}/{FOLDER}"
    assert report.first_timestamp == datetime(2026, 2, 7, 12, tzinfo=UTC)
    assert report.last_timestamp == datetime(2026, 2, 7, 23, 59, 59, tzinfo=UTC)
    common = {"device_id": "D1", "day_of_week": 5, "is_weekend": True}
    assert folder_rows(stack) == [
        {
            "timestamp": datetime(2026, 2, 7, 12, tzinfo=UTC),
            "device_type": "bulb",
            "location": "lab",
            "voltage": 230.0,
            "current": 0.5,
            "power": 100.0,
            "temperature": 21.5,
            "hour": 12,
            "power_factor": 100 / 115,
            **common,
        },
        {
            "timestamp": datetime(2026, 2, 7, 12, 4, 59, 999_999, tzinfo=UTC),
            "device_type": "bulb",
            "location": "lab",
            "voltage": 231.25,
            "current": 2.0,
            "power": 1000.0,
            "temperature": None,
            "hour": 12,
            "power_factor": 1.0,
            **common,
        },
        {
            "timestamp": datetime(2026, 2, 7, 12, 5, tzinfo=UTC),
            "device_type": "compressor",
            "location": "roof",
            "voltage": 229.0,
            "current": 0.0,
            "power": 3.0,
            "temperature": None,
            "hour": 12,
            "power_factor": None,
            **common,
        },
        {
            "timestamp": datetime(2026, 2, 7, 23, 59, 59, tzinfo=UTC),
            "device_type": "bulb",
            "location": "lab",
            "voltage": None,
            "current": None,
            "power": None,
            "temperature": -4.5,
            "hour": 23,
            "power_factor": None,
            **common,
        },
    ]


def test_parquet_files_carry_the_declared_schema_their_codec_and_dictionary_strings(
    stack: Stack,
) -> None:
    """A slice of few rows is compressed with Snappy (zstd's set-up per column would cost more
    CPU than it saves bytes), a slice of SMALL_SLICE_ROWS rows or more with zstd."""
    stack.write([point(at(1), "D1", {"voltage": 230})])
    many = [
        point(at(2, 0, second), "D1", {"voltage": second}) for second in range(SMALL_SLICE_ROWS)
    ]
    stack.write(many)
    export(stack)
    codecs = {}
    for key in (FOLDER + "export_010000.parquet", FOLDER + "export_020000.parquet"):
        assert stack.table(key).schema.remove_metadata() == SCHEMA
        body = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"]
        metadata = pq.ParquetFile(pa.BufferReader(body.read())).metadata.row_group(0)
        columns = {metadata.column(i).path_in_schema: metadata.column(i) for i in range(12)}
        codecs[key[len(FOLDER) :]] = {column.compression for column in columns.values()}
        for name in SEED_COLUMNS.dictionary_columns:
            assert "RLE_DICTIONARY" in columns[name].encodings
    assert codecs == {"export_010000.parquet": {"SNAPPY"}, "export_020000.parquet": {"ZSTD"}}
    assert len(stack.table(FOLDER + "export_020000.parquet")) == SMALL_SLICE_ROWS


def test_a_rerun_rewrites_the_same_keys_with_the_same_content(stack: Stack) -> None:
    stack.write([point(at(h, m), "D1", {"voltage": h + m / 60}) for h in (3, 9) for m in (0, 7)])
    export(stack)
    first = stack.objects()
    assert sorted(first) == [
        FOLDER + f"export_{h:02d}{m:02d}00.parquet" for h in (3, 9) for m in (0, 5)
    ]
    # Overwritten behind the exporter's back: only a rerun that writes every key again, with the
    # same bytes, gives the first export's objects back.
    for key in first:
        stack.s3.put_object(Bucket=stack.bucket, Key=key, Body=b"not the export")
    report = export(stack)
    assert report.files_written == [f"s3://{stack.bucket}/{key}" for key in sorted(first)]
    assert stack.objects() == first
    assert report.files_deleted == []
    assert len(folder_rows(stack)) == 4


def test_slices_that_no_longer_have_rows_are_deleted(stack: Stack) -> None:
    stack.write([point(at(3), "D1", {"voltage": 1}), point(at(9), "D1", {"voltage": 2})])
    export(stack)
    stack.influx.query(
        f"DELETE FROM telemetry WHERE time >= {at(9)} AND time < {at(10)}", stack.database
    )
    unrelated = "telemetry/device_id=D1/date=2026/02/07/notes.txt"
    stack.s3.put_object(Bucket=stack.bucket, Key=unrelated, Body=b"kept")
    report = export(stack)
    assert report.files_deleted == [f"s3://{stack.bucket}/{FOLDER}export_090000.parquet"]
    assert sorted(stack.objects()) == [FOLDER + "export_030000.parquet", unrelated]


class RecordedS3(ObjectStore):
    """The pipeline's S3 client on the test's bucket, recording in order each object put (once
    S3 has answered) and each batch of deletes (before it is sent), and able to fail the put of
    one key as a connection reset would, before anything is sent."""

    def __init__(self, stack: Stack, fail_key: str | None = None) -> None:
        made = stack.store()
        super().__init__(made.store, made.bucket, endpoint=made.endpoint, key_id=made.key_id)
        self.fail_key = fail_key
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    def put(self, body: bytes, *, key: str, fmt: str) -> None:
        self._sent(key)
        super().put(body, key=key, fmt=fmt)
        self._record("put", [key])

    def upload(self, path: Path, *, key: str, fmt: str) -> None:
        self._sent(key)
        super().upload(path, key=key, fmt=fmt)
        self._record("put", [key])

    def delete(self, keys: list[str]) -> None:
        self._record("delete", keys)
        super().delete(keys)

    def _sent(self, key: str) -> None:
        if key == self.fail_key:
            raise ConnectionResetError(f"S3 went away while {key} was uploaded")

    def _record(self, call: str, keys: list[str]) -> None:
        with self._lock:
            self.calls.append((call, tuple(keys)))

    def export(self, stack: Stack) -> ExportReport:
        settings = stack.settings()
        return write_slices(
            InfluxSource(settings.influx),
            self,
            prefix=settings.s3.prefix,
            device_id="D1",
            piece=DayRange.whole(DAY),
            settings=settings.export,
        )


def a_slice_moves_from_nine_to_five(stack: Stack) -> dict[str, bytes]:
    """03:00 and 09:00 exported; then InfluxDB loses 09:00 and gains 05:00. The folder before."""
    stack.write([point(at(3), "D1", {"voltage": 1}), point(at(9), "D1", {"voltage": 2})])
    export(stack)
    stack.influx.query(
        f"DELETE FROM telemetry WHERE time >= {at(9)} AND time < {at(10)}", stack.database
    )
    stack.write([point(at(5), "D1", {"voltage": 3})])
    return stack.objects()


def test_stale_objects_are_deleted_only_after_every_upload_succeeded(stack: Stack) -> None:
    a_slice_moves_from_nine_to_five(stack)
    s3 = RecordedS3(stack)
    report = s3.export(stack)
    puts = [keys for call, keys in s3.calls if call == "put"]
    assert sorted(puts) == [
        (FOLDER + "export_030000.parquet",),
        (FOLDER + "export_050000.parquet",),
    ]
    assert s3.calls[-1] == ("delete", (FOLDER + "export_090000.parquet",))
    assert [call for call, _ in s3.calls] == ["put", "put", "delete"]
    assert report.files_deleted == [f"s3://{stack.bucket}/{FOLDER}export_090000.parquet"]
    assert assert_reconciled(stack, "D1", [DAY], settings=stack.settings()) == 2


def test_a_failed_upload_deletes_nothing(stack: Stack) -> None:
    before = a_slice_moves_from_nine_to_five(stack)
    s3 = RecordedS3(stack, fail_key=FOLDER + "export_050000.parquet")
    with pytest.raises(ConnectionResetError, match="went away"):
        s3.export(stack)
    assert [call for call, _ in s3.calls] == ["put"]  # 03:00 rewritten; no delete was sent
    assert stack.objects() == before  # 09:00, stale, is still there with what it held
    # The next export, without the fault, makes the folder equal to InfluxDB.
    RecordedS3(stack).export(stack)
    assert assert_reconciled(stack, "D1", [DAY], settings=stack.settings()) == 2


def test_a_day_without_points_writes_nothing_and_reports_zero_rows(stack: Stack) -> None:
    stack.write([point(at(3), "D2", {"voltage": 1})])
    report = export(stack)
    assert report.rows == 0 and report.files_written == []
    assert stack.objects() == {}


def test_batches_smaller_than_a_slice_still_make_one_file_per_slice(stack: Stack) -> None:
    stack.write([point(at(5) + i * NS, "D1", {"voltage": float(i)}) for i in range(1_500)])
    export(stack, EXPORT_BATCH_SIZE="100", EXPORT_INTERVAL_SECONDS="600")
    keys = sorted(stack.objects())
    assert keys == [
        FOLDER + "export_050000.parquet",
        FOLDER + "export_051000.parquet",
        FOLDER + "export_052000.parquet",
    ]
    voltages = [row["voltage"] for row in folder_rows(stack)]
    assert voltages == [float(i) for i in range(1_500)]


def test_csv_has_a_header_and_iso_utc_timestamps(stack: Stack) -> None:
    stack.write([point(at(12), "D1", {"voltage": 230, "current": 1, "power": 115})])
    export(stack, EXPORT_FORMAT="csv")
    body = stack.objects()[FOLDER + "export_120000.csv"].decode()
    header, row = body.splitlines()
    assert header.split(",") == [f'"{name}"' for name in SCHEMA.names]
    # Strings are quoted, so an empty string and a null (nothing) stay distinct.
    assert row == '"2026-02-07T12:00:00.000000Z","D1","bulb","lab",230,1,115,,12,5,true,0.5'


def test_switching_format_replaces_the_other_formats_files(stack: Stack) -> None:
    stack.write([point(at(12), "D1", {"voltage": 230})])
    export(stack, EXPORT_FORMAT="csv")
    export(stack)
    assert sorted(stack.objects()) == [FOLDER + "export_120000.parquet"]
    assert assert_reconciled(stack, "D1", [DAY], settings=stack.settings()) == 1


def test_hive_layout_writes_one_date_folder(stack: Stack) -> None:
    stack.write([point(at(12), "D1", {"voltage": 230})])
    export(stack, EXPORT_LAYOUT="hive")
    assert sorted(stack.objects()) == [
        "telemetry/device_id=D1/date=2026-02-07/export_120000.parquet"
    ]
    assert assert_reconciled(stack, "D1", [DAY], settings=stack.settings(EXPORT_LAYOUT="hive")) == 1


def test_a_missing_bucket_is_named_in_the_error(stack: Stack) -> None:
    store = stack.store(S3_BUCKET="no-such-bucket")
    with pytest.raises(StoreError, match="S3_BUCKET='no-such-bucket' does not exist"):
        store.check()


def test_a_wrong_secret_is_refused_naming_s3_and_the_key_id_never_the_secret(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = stack.store()
    with pytest.raises(StoreError) as refused:
        store.check()
    message = str(refused.value)
    assert f"S3 at S3_ENDPOINT_URL={stack.s3_url}" in message
    assert "access key id testing-key-id" in message
    assert "not-the-secret" not in message and "testing-secret" not in message


def test_keys_from_an_aws_profile_reach_s3(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[exporter]\naws_access_key_id = testing-key-id\naws_secret_access_key = testing-secret\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "exporter")
    store = stack.store()
    store.put(b"x", key="telemetry/probe.csv", fmt="csv")
    assert store.list_keys("telemetry/") == {"telemetry/probe.csv": 1}


def test_an_unreachable_s3_endpoint_is_named_in_the_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    store = ExportBucketResource.from_settings(S3Settings("exports", endpoint_url=url)).store()
    with pytest.raises(StoreError, match=f"S3 at S3_ENDPOINT_URL={url} .* is unreachable"):
        store.check()


def test_an_empty_answer_never_empties_a_folder(stack: Stack) -> None:
    stack.write([point(at(3), "D1", {"voltage": 1}), point(at(9), "D1", {"voltage": 2})])
    export(stack)
    before = stack.objects()
    stack.influx.query("DELETE FROM telemetry WHERE time > 0", stack.database)
    with pytest.raises(EmptyReadRefused, match="holds 2 objects there; nothing was deleted"):
        export(stack)
    assert stack.objects() == before


def test_a_missing_measurement_is_named_in_the_error(stack: Stack) -> None:
    stack.write([point(at(3), "D1", {"voltage": 1})])
    source = InfluxSource(stack.settings(INFLUXDB_MEASUREMENT="telemetri").influx)
    with pytest.raises(InfluxError, match="INFLUXDB_MEASUREMENT='telemetri' does not exist"):
        source.check()


def readers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "influx-reader" and t.is_alive()}


def test_a_failing_export_stops_its_reader_thread_promptly() -> None:
    """The reader runs ahead on a thread; an error in the encoder must not leave it blocked."""
    depth = 2
    batches = [
        pa.RecordBatch.from_pylist([{"time": at(12) + i}], schema=SOURCE_SCHEMA)
        for i in range(depth + 3)
    ]
    queue_full, closed = threading.Event(), threading.Event()

    def source() -> Iterator[pa.RecordBatch]:
        try:
            for index, batch in enumerate(batches):
                # Asked for this batch, the reader has queued the ones before it: with one taken
                # by the consumer, `depth` wait in the queue, so this one's put cannot succeed.
                if index == depth + 1:
                    queue_full.set()
                yield batch
        finally:
            closed.set()

    before = readers()
    reading = prefetched(source(), depth=depth)
    assert next(reading).num_rows == 1
    (reader,) = readers() - before
    assert queue_full.wait(timeout=30)
    assert not closed.is_set() and reader.is_alive()  # blocked on its put, the source open
    reading.close()  # as an error in the encoder closes it
    assert closed.wait(timeout=5)
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_an_error_in_the_source_reaches_the_consumer() -> None:
    def source() -> Iterator[pa.RecordBatch]:
        yield pa.RecordBatch.from_pylist([{"time": at(12)}], schema=SOURCE_SCHEMA)
        raise InfluxError("broke off")

    reading = prefetched(source())
    next(reading)
    with pytest.raises(InfluxError, match="broke off"):
        next(reading)
