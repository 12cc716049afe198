"""`register_devices`: turn DEVICE_IDS into `devices` partitions."""

from dagster import Failure, OpExecutionContext, job, op

from export_pipeline.layout import DeviceIdError, validate_device_id
from export_pipeline.partitions import devices
from export_pipeline.resources import ExportResource


def refused_ids(device_ids: list[str]) -> list[str]:
    """The reason for each id that cannot be a partition key and S3 path segment."""
    reasons = []
    for device_id in device_ids:
        try:
            validate_device_id(device_id)
        except DeviceIdError as error:
            reasons.append(str(error))
    return reasons


@op
def add_devices(context: OpExecutionContext, export: ExportResource) -> list[str]:
    """Registers every id in DEVICE_IDS, or none of them if any is unsafe."""
    if not export.device_ids:
        raise Failure("DEVICE_IDS is empty: set it to the device ids to export, comma-separated")
    refused = refused_ids(export.device_ids)
    if refused:
        raise Failure("DEVICE_IDS has unsafe ids, none were registered: " + "; ".join(refused))
    assert devices.name is not None
    known = set(context.instance.get_dynamic_partitions(devices.name))
    new = [device_id for device_id in export.device_ids if device_id not in known]
    context.instance.add_dynamic_partitions(devices.name, new)
    context.log.info(f"registered {len(new)} new devices: {', '.join(new) or '(none)'}")
    return new


@job
def register_devices() -> None:
    add_devices()
