"""`day_files`: the IO manager of `telemetry_daily`, whose partitions are dates.

The asset publishes its day files itself, as they are written (a device that fails does not hold
back the others), so this manager only loads: a date, or every date a downstream partition maps
to, as Arrow (a `pyarrow.Table`, or a `pyarrow.dataset.Dataset` that streams from S3 for days too
big to hold), with every device's day file of it, or only the device of a downstream partition
that has one (devices x dates, mapped to its date). A downstream asset only declares
`telemetry_daily` as an input; it never needs a key.

`day_table` loads the same rows through the Iceberg table's current snapshot instead (an input
with `input_manager_key="day_table"`): one consistent snapshot of the dates, found from the
table's manifests rather than the export record.
"""

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from export_pipeline.defs.resources import ExportBucketResource, IcebergResource
from export_pipeline.engine.layout import day_file_key
from export_pipeline.engine.schema import SCHEMA
from export_pipeline.engine.slice_files import UPLOAD_THREADS
from export_pipeline.engine.table import day_filter, device_filter
from export_pipeline.record.keys import DEVICES, DeviceDay
from export_pipeline.record.ledger import day_file_records

if TYPE_CHECKING:
    # Imported where used: pyarrow.dataset imports pandas, 0.4 s at every run's start.
    import pyarrow.dataset as ds


class DayFilesIOManager(ConfigurableIOManager):
    """Day files under S3_DAILY_PREFIX, in the bucket of the `s3` resource."""

    s3: ResourceDependency[ExportBucketResource]

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        """Never given a value: telemetry_daily publishes its files as it writes them."""
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()} publishes its own files")

    def load_input(self, context: InputContext) -> "pa.Table | ds.Dataset":
        import pyarrow.dataset as ds

        days = [date.fromisoformat(key) for key in context.asset_partition_keys]
        devices = _downstream_device(context) or context.instance.get_dynamic_partitions(DEVICES)
        records = day_file_records(context.instance, devices, days)
        # The ledger names the device-days written with a file (a day without rows has none);
        # each is looked for, as the bucket is the truth (a file removed by hand is not read).
        candidates = [
            day_file_key(self.s3.daily_prefix, device_id=device_id, day=day)
            for (device_id, day), record in sorted(records.items())
            if record.files != 0
        ]
        store = self.s3.store(connections=UPLOAD_THREADS)
        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="find") as pool:
            found = pool.map(
                lambda key: key in store.list_keys(key.rsplit("/", 1)[0] + "/"), candidates
            )
            keys = [key for key, present in zip(candidates, list(found), strict=True) if present]
        # Files written before a field appeared lack its column: the dataset's schema is the
        # union of the files' (their footers read), a missing column reading as nulls.
        factory = ds.FileSystemDatasetFactory(
            self.s3.filesystem(),
            [f"{self.s3.bucket}/{key}" for key in keys],
            ds.ParquetFileFormat(),
        )
        # Permissive: a field declared another type later (EXPORT_FIELD_TYPES) still unifies.
        dataset = factory.finish(factory.inspect(promote_options="permissive") if keys else SCHEMA)
        if context.dagster_type.typing_type is ds.Dataset:
            return dataset
        return dataset.to_table()


class DayTableIOManager(ConfigurableIOManager):
    """telemetry_daily's dates read through the Iceberg table's current snapshot."""

    s3: ResourceDependency[ExportBucketResource]
    iceberg: ResourceDependency[IcebergResource]

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        raise TypeError(f"{context.asset_key.to_user_string()} is read here, never written")

    def load_input(self, context: InputContext) -> "pa.Table | ds.Dataset":
        import pyarrow.dataset as ds
        from pyiceberg.expressions import And, Or

        table = self.iceberg.daily_table(self.s3)
        if table is None:
            raise ValueError("ICEBERG_ENABLED is false: there is no table to read")
        try:
            if table.load(None) is None:
                raise ValueError(f"the Iceberg table {table.name} does not exist yet")
            days = sorted(date.fromisoformat(key) for key in context.asset_partition_keys)
            condition = Or(*map(day_filter, days)) if len(days) > 1 else day_filter(days[0])
            if devices := _downstream_device(context):
                condition = And(condition, device_filter(devices[0]))
            found = table.table.scan(row_filter=condition).to_arrow()
        finally:
            table.close()
        if context.dagster_type.typing_type is ds.Dataset:
            return ds.dataset(found)
        return found


def _downstream_device(context: InputContext) -> list[str]:
    """The device of the downstream partition, where it is a device-day (a downstream partitioned
    by date reads every device)."""
    found = DeviceDay.find(context.partition_key) if context.has_partition_key else None
    return [found.device_id] if found else []


def with_io_managers(resources: Mapping[str, Any]) -> dict[str, Any]:
    """`resources` and the IO managers made of them."""
    return {
        **resources,
        "day_files": DayFilesIOManager(s3=resources["s3"]),
        "day_table": DayTableIOManager(s3=resources["s3"], iceberg=resources["iceberg"]),
    }
