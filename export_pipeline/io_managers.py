"""`day_files`: the IO manager of `telemetry_daily`, where one partition is one object.

It publishes the day files the asset staged on local disk (each one upload, whole), and loads a
device-day, or every device-day a downstream partition maps to, as Arrow: a `pyarrow.Table`, or a
`pyarrow.dataset.Dataset` that streams from S3 for days too big to hold. A downstream asset only
declares `telemetry_daily` as an input; it never needs a key.
"""

import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from export_pipeline.daily import StagedDay, publish
from export_pipeline.layout import day_file_key
from export_pipeline.partitions import DeviceDay
from export_pipeline.resources import ExportBucketResource
from export_pipeline.schema import SCHEMA
from export_pipeline.slices import UPLOAD_THREADS

StagedDays = Mapping[str, StagedDay]  # by partition key


class DayFilesIOManager(ConfigurableIOManager):
    """Day files under S3_DAILY_PREFIX, in the bucket of the `s3` resource."""

    s3: ResourceDependency[ExportBucketResource]

    def handle_output(self, context: OutputContext, obj: StagedDays) -> None:
        store = self.s3.store(connections=UPLOAD_THREADS)
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="publish") as pool:
                # list(): the first failed upload is raised, after the others have ended.
                list(pool.map(lambda key: publish(store, obj[key]), context.asset_partition_keys))
        finally:
            for directory in {staged.path.parent for staged in obj.values() if staged.path}:
                shutil.rmtree(directory, ignore_errors=True)

    def load_input(self, context: InputContext) -> pa.Table | ds.Dataset:
        store = self.s3.store()
        keys = [
            day_file_key(self.s3.daily_prefix, device_id=device_id, day=day)
            for device_id, day in map(DeviceDay.of, context.asset_partition_keys)
        ]
        folders = {key.rsplit("/", 1)[0] + "/" for key in keys}
        present = {key for folder in folders for key in store.list_keys(folder)}
        paths = [f"{self.s3.bucket}/{key}" for key in keys if key in present]
        dataset = ds.dataset(
            paths, schema=SCHEMA, format="parquet", filesystem=self.s3.filesystem()
        )
        if context.dagster_type.typing_type is ds.Dataset:
            return dataset
        return dataset.to_table()


def with_io_managers(resources: Mapping[str, Any]) -> dict[str, Any]:
    """`resources` and the IO managers made of them."""
    return {**resources, "day_files": DayFilesIOManager(s3=resources["s3"])}
