"""`register_devices`: the ids in DEVICE_IDS registered as `devices` partitions."""

from dagster import (
    Failure,
    OpExecutionContext,
    job,
    op,
)

from export_pipeline.defs.planning import (
    admit,
)
from export_pipeline.defs.resources import (
    ExportResource,
)
from export_pipeline.record.keys import (
    DEVICES,
)


@op
def add_devices(context: OpExecutionContext, export: ExportResource) -> list[str]:
    """Registers every id in DEVICE_IDS, or none of them if any is unsafe."""
    device_ids = export.settings().device_ids
    if not device_ids:
        raise Failure("DEVICE_IDS is empty: set it to the device ids to export, comma-separated")
    _, refused = admit(device_ids)
    if refused:
        raise Failure(
            "DEVICE_IDS has unsafe ids, none were registered: " + "; ".join(refused.values())
        )
    known = set(context.instance.get_dynamic_partitions(DEVICES))
    new = [device_id for device_id in device_ids if device_id not in known]
    context.instance.add_dynamic_partitions(DEVICES, new)
    context.log.info(f"registered {len(new)} new devices: {', '.join(new) or '(none)'}")
    return new


@job
def register_devices() -> None:
    add_devices()
