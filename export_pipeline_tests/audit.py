"""The end of every fault scenario: each device-day's S3 folder holds exactly InfluxDB's rows.

Both sides are read in full (every object of the folder, every point of the day), so a row lost,
written twice, or left over from an older export fails the comparison, value by value.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from export_pipeline.influx import InfluxSource
from export_pipeline.layout import device_folder
from export_pipeline.schema import SCHEMA, to_export
from export_pipeline.slicing import day_bounds_ns
from export_pipeline_tests.conftest import Stack

Row = dict[str, Any]


def _ordered(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda row: (row["timestamp"], repr(sorted(row.items()))))


def influx_rows(stack: Stack, device_id: str, day: date) -> list[Row]:
    """The device-day's points in InfluxDB, as the export's columns."""
    start_ns, end_ns = day_bounds_ns(day)
    with InfluxSource(stack.settings().influx) as source:
        read = source.read(device_id, start_ns=start_ns, end_ns=end_ns)
        batches = [to_export(batch, device_id) for batch in read]
    return _ordered(pa.Table.from_batches(batches, schema=SCHEMA).to_pylist())


def s3_rows(stack: Stack, device_id: str, day: date) -> list[Row]:
    """Every row of every object in the device-day's folder."""
    client, folder = (
        stack.s3,
        device_folder(stack.prefix, device_id=device_id, day=day, layout="seed"),
    )
    tables = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix=folder
    ):
        for item in page.get("Contents", []):
            assert item["Key"].endswith(".parquet"), f"unexpected object {item['Key']}"
            body = client.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read()
            tables.append(pq.read_table(io.BytesIO(body)))
    return _ordered(pa.concat_tables(tables).to_pylist()) if tables else []


def assert_reconciled(
    stack: Stack, device_id: str, days: Iterable[date], unique: bool = True
) -> int:
    """InfluxDB's rows = the folder's rows for each device-day, and (when the data has one
    series per device) no (device_id, timestamp) twice. Returns the rows compared."""
    total = 0
    for day in days:
        expected, exported = influx_rows(stack, device_id, day), s3_rows(stack, device_id, day)
        assert len(exported) == len(expected), (
            f"{day}|{device_id}: S3 holds {len(exported)} rows, InfluxDB {len(expected)}"
        )
        assert exported == expected, f"{day}|{device_id}: S3's rows differ from InfluxDB's"
        if unique:
            keys = [(row["device_id"], row["timestamp"]) for row in exported]
            assert len(keys) == len(set(keys)), f"{day}|{device_id}: a timestamp is duplicated"
        total += len(exported)
    return total
