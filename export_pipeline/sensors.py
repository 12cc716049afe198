"""`continuous_export`: the only scheduler. Each tick registers devices, reads every device's
checkpoint from Dagster's storage, and requests batched runs for the slices that are due."""

from datetime import timedelta

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from export_pipeline.jobs import ExportSlicesConfig, WorkItemConfig, export_due_slices
from export_pipeline.layout import DeviceIdError, validate_device_id
from export_pipeline.ledger import busy_devices, checkpoints
from export_pipeline.partitions import devices
from export_pipeline.planning import batches, due_work, first_due
from export_pipeline.resources import ClockResource, ExportResource, InfluxDBResource
from export_pipeline.settings import Settings
from export_pipeline.slicing import NS_PER_SECOND, closed_until


def build_continuous_export(settings: Settings) -> SensorDefinition:
    @sensor(
        name="continuous_export",
        job=export_due_slices,
        minimum_interval_seconds=settings.export.interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def continuous_export(
        context: SensorEvaluationContext,
        influxdb: InfluxDBResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> SensorResult:
        config, now, instance = export.settings(), clock.now(), context.instance
        assert devices.name is not None
        known = set(instance.get_dynamic_partitions(devices.name))
        candidates = list(config.device_ids)
        if not candidates:  # DEVICE_IDS empty or `*`: every device InfluxDB has seen lately
            since = first_due(now, config)
            try:
                candidates = influxdb.source().device_ids(int(since.timestamp()) * NS_PER_SECOND)
            except Exception as error:
                context.log.warning(f"device discovery failed, using known devices: {error}")
                candidates = sorted(known)
        fleet = []
        for device_id in candidates:
            try:
                fleet.append(validate_device_id(device_id))
            except DeviceIdError as error:
                context.log.warning(f"skipped: {error}")
        new = [device_id for device_id in fleet if device_id not in known]

        busy, dead = busy_devices(instance, timedelta(seconds=config.stale_run_after))
        for run_id in dead:
            context.log.warning(f"run {run_id} presumed dead and marked failed")
        start = first_due(now, config) - timedelta(days=1)
        dates = [
            start.date() + timedelta(days=n) for n in range((now.date() - start.date()).days + 1)
        ]
        done = checkpoints(instance, fleet, dates)
        work = due_work([d for d in fleet if d not in busy], done, now, config)
        until = closed_until(now, config.interval_seconds, config.lateness_seconds)
        requests = [
            RunRequest(
                run_key=f"{until.isoformat()}-batch-{index}",
                run_config={
                    "ops": {
                        "export_slices": {
                            "config": ExportSlicesConfig(
                                work=[
                                    WorkItemConfig(
                                        device_id=item.device_id,
                                        date=item.range.day.isoformat(),
                                        start=item.range.start,
                                        end=item.range.end,
                                    )
                                    for item in batch
                                ]
                            ).model_dump()
                        }
                    }
                },
                tags={
                    "export/through": until.isoformat(),
                    "export/devices": str(len({item.device_id for item in batch})),
                },
            )
            for index, batch in enumerate(batches(work, config.devices_per_run))
        ]
        context.log.info(
            f"{len(fleet)} devices ({len(new)} new, {len(busy)} busy): {len(work)} device-day "
            f"ranges due through {until.isoformat()} in {len(requests)} runs"
        )
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[devices.build_add_request(new)] if new else [],
        )

    return continuous_export
