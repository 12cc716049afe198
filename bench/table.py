"""P11: the Iceberg table of closed days after a year of commits.

A table on the real catalog (PostgreSQL) and S3 (SeaweedFS) gets a year of dates, one commit
each with the retention applied as `iceberg_maintenance` would (snapshots kept for 7 days, older
metadata files deleted, the sweep at the end); the year's first dates reference synthetic entries
(their statistics taken from a real day file), the last week real day files of every device. Then:

- the commit of one more date's real day files after the year, as the run that wrote them
  commits it (`DailyTable.commit_date` with each file's size and footer from the run's
  reconciliation): target <= 2 s at 1,000 devices; beside it the week's commits that looked
  each file up in S3 (a LIST and a footer read each: what `iceberg_maintenance` does);
- the bytes under the table's folder (`_iceberg/`) after the year, with the retention;
- DuckDB reading one device's week through the table (`iceberg_scan`) and from the folder layout
  (`read_parquet` of its date folders), in the same run.

    .venv/bin/python -m bench.table                  # 1,000 devices, 365 dates
    .venv/bin/python -m bench.table --devices 100 --dates 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.run import Bench, record
from export_pipeline.defs.resources import build_resources
from export_pipeline.engine.files import DAY_FILE_PARQUET, DAY_FILE_ROWS_PER_GROUP, ExportFile
from export_pipeline.engine.layout import day_file_key
from export_pipeline.engine.reconciliation import footer_bytes, parquet_footer
from export_pipeline.engine.schema import SCHEMA, SOURCE_SCHEMA, to_export
from export_pipeline.engine.table import DATE_PROPERTY, DailyTable

FIRST_DAY = date(2025, 1, 1)
ROWS = 1_440  # a point a minute
KEPT_SNAPSHOTS = 7  # a commit a day, ICEBERG_SNAPSHOT_RETENTION_DAYS=7


def day_file(directory: Path, device_id: str, day: date) -> Path:
    """A real day file of the device-day, written as the export writes it."""
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 10**9
    times = pa.array([start + i * 60 * 10**9 for i in range(ROWS)], pa.int64())
    values = [float(i % 97) for i in range(ROWS)]
    batch = pa.RecordBatch.from_arrays(
        [
            times,
            pa.array(["meter"] * ROWS),
            pa.array(["site-1"] * ROWS),
            pa.array([230.0 + v / 100 for v in values]),
            pa.array([1.0 + v / 1000 for v in values]),
            pa.array([200.0 + v for v in values]),
            pa.array([20.0 + v / 10 for v in values]),
        ],
        schema=SOURCE_SCHEMA,
    )
    path = directory / f"{device_id}-{day}.parquet"
    writer = ExportFile(
        path, "parquet", rows_per_group=DAY_FILE_ROWS_PER_GROUP, parquet=DAY_FILE_PARQUET
    )
    writer.write(to_export(batch, device_id))
    writer.close()
    return path


def write_real_days(table: DailyTable, fleet: list[str], days: list[date], staging: Path) -> None:
    def put(job: tuple[str, date]) -> None:
        device_id, day = job
        path = day_file(staging, device_id, day)
        key = day_file_key(table.daily_prefix, device_id=device_id, day=day)
        table.store.upload(path, key=key, fmt="parquet")
        path.unlink()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, [(device, day) for day in days for device in fleet]))


def commit_synthetic(table: DailyTable, template: Any, fleet: list[str], day: date) -> None:
    """A date of entries with the template's statistics and the date's partition values, in
    one commit: what a year of real commits leaves in the metadata, without a year of files."""
    from pyiceberg.manifest import DATA_FILE_TYPE, DEFAULT_READ_VERSION, DataFile
    from pyiceberg.typedef import Record

    epoch_days = (day - date(1970, 1, 1)).days
    names = [field.name for field in DATA_FILE_TYPE[DEFAULT_READ_VERSION].fields]
    files = []
    for device_id in fleet:
        fields = {name: getattr(template, name) for name in names}
        fields["file_path"] = table.store.uri(
            f"{table.daily_prefix}/history/device_id={device_id}/date={day}/data.parquet"
        )
        fields["partition"] = Record(epoch_days, device_id)
        files.append(DataFile.from_args(**fields))
    with table.table.transaction() as tx:
        producer = tx.update_snapshot(snapshot_properties={DATE_PROPERTY: day.isoformat()})
        with producer.fast_append() as append:
            for data_file in files:
                append.append_data_file(data_file)


def reconciled(table: DailyTable, fleet: list[str], day: date) -> dict[str, Any]:
    """What the run that wrote the date's files found of each when it reconciled it (its
    size and footer, read from S3 as `DayFiles.footer` reads them): the run's commit takes
    them from there."""

    def look(device_id: str) -> tuple[str, Any]:
        key = day_file_key(table.daily_prefix, device_id=device_id, day=day)
        size = table.store.list_keys(key.rsplit("/", 1)[0] + "/")[key]
        return key, (size, footer_bytes(parquet_footer(table.store, key)))

    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(look, fleet))


def expire_beyond_retention(table: DailyTable) -> None:
    snapshots = sorted(table.table.snapshots(), key=lambda s: s.timestamp_ms)
    old = [s.snapshot_id for s in snapshots[:-KEPT_SNAPSHOTS]]
    if old:
        table.table.maintenance.expire_snapshots().by_ids(old).commit()
        table.load(None)


def folder_bytes(bench: Bench, prefix: str) -> tuple[int, int]:
    sizes = bench.folder_sizes(prefix)
    return len(sizes), sum(sizes)


def p11(bench: Bench, devices: int, dates: int) -> dict[str, Any]:
    fleet = [f"p11-{i:04d}" for i in range(devices)]
    found = build_resources(bench.settings())
    table = found["iceberg"].daily_table(found["s3"])  # type: ignore[attr-defined]
    assert table is not None
    table.load(SCHEMA)
    days = [FIRST_DAY + timedelta(days=n) for n in range(dates)]
    week, measured = days[-8:-1], days[-1]
    with tempfile.TemporaryDirectory(prefix="p11-") as staging:
        started = time.perf_counter()
        write_real_days(table, fleet, [*week, measured], Path(staging))
        written = time.perf_counter() - started
    template_key = day_file_key(table.daily_prefix, device_id=fleet[0], day=measured)
    footer = parquet_footer(table.store, template_key)
    uri = table.store.uri(template_key)
    template = table.data_files_of(table.table.metadata, {uri: footer})[0]
    commit_seconds = []
    for n, day in enumerate(days[:-1]):
        started = time.perf_counter()
        if day in week:
            table.commit_date(day, fleet)
        else:
            commit_synthetic(table, template, fleet, day)
        commit_seconds.append(time.perf_counter() - started)
        expire_beyond_retention(table)
        if n % 50 == 0:
            print(f"  {n} dates committed, last {commit_seconds[-1]:.2f} s", flush=True)
    seen = reconciled(table, fleet, measured)
    started = time.perf_counter()
    report = table.commit_date(measured, fleet, seen=seen)
    last_commit = time.perf_counter() - started
    expire_beyond_retention(table)
    table.maintain(now=datetime.now(UTC) + timedelta(hours=2), retention=timedelta(days=3650))
    metadata_files, metadata_bytes = folder_bytes(bench, f"{table.root}/")
    current = table.catalog.load_table(table.identifier)
    current_json = [
        size
        for key, size in table.store.list_keys(f"{table.root}/metadata/").items()
        if key.endswith(current.metadata_location.rsplit("/", 1)[1])
    ]

    # DuckDB: one device's week, through the table and from the folders.
    import duckdb
    from duckdb_extensions import import_extension

    connection = duckdb.connect()
    for extension in ("httpfs", "avro", "iceberg"):
        import_extension(extension, con=connection)
        connection.sql(f"LOAD {extension}")
    endpoint = bench.s3_server.url.split("://")[1]
    connection.sql(
        "CREATE SECRET s3 (TYPE s3, KEY_ID 'bench', SECRET 'bench-secret', REGION 'us-east-1', "
        f"ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)"
    )
    device, first, end = fleet[len(fleet) // 2], week[0], measured
    through_table = f"""
        SELECT count(*), avg(power) FROM iceberg_scan('{current.metadata_location}')
        WHERE device_id = '{device}' AND timestamp >= TIMESTAMPTZ '{first} 00:00:00+00'
          AND timestamp < TIMESTAMPTZ '{end} 00:00:00+00'"""
    from_folders = f"""
        SELECT count(*), avg(power) FROM read_parquet(
            's3://{bench.bucket}/{table.daily_prefix}/device_id={device}/date=*/*.parquet',
            hive_partitioning = true)
        WHERE date >= DATE '{first}' AND date < DATE '{end}'"""

    def timed(query: str) -> tuple[float, Any]:
        runs, answer = [], None
        for _ in range(5):
            started = time.perf_counter()
            answer = connection.sql(query).fetchall()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs), answer

    table_seconds, table_answer = timed(through_table)
    folder_seconds, folder_answer = timed(from_folders)
    assert table_answer == folder_answer, (table_answer, folder_answer)
    return {
        "devices": devices,
        "dates": dates,
        "real_day_files": len(fleet) * 8,
        "write_real_day_files_s": round(written, 1),
        "commit_of_a_date_after_the_year_s": round(last_commit, 2),
        "commit_added": report.added,
        "commit_of_a_week_from_s3_median_s": round(
            statistics.median(commit_seconds[-len(week) :]), 2
        ),
        "commit_first_10_median_s": round(statistics.median(commit_seconds[:10]), 2),
        "commit_last_10_median_s": round(statistics.median(commit_seconds[-10:]), 2),
        "table_folder_after_the_year": {"files": metadata_files, "bytes": metadata_bytes},
        "current_metadata_json_bytes": current_json[0] if current_json else None,
        "snapshots_kept": len(current.snapshots()),
        "duckdb_one_device_week_through_table_s": round(table_seconds, 3),
        "duckdb_one_device_week_from_folders_s": round(folder_seconds, 3),
        "duckdb_rows": table_answer[0][0],
        "target": "commit <= 2 s after a year at 1,000 devices; the rest reported",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--dates", type=int, default=365)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        bench = Bench(Path(root))
        try:
            result = p11(bench, args.devices, args.dates)
        finally:
            bench.close()
    record(f"P11 Iceberg table after {args.dates} dates x {args.devices} devices", result)


if __name__ == "__main__":
    main()
