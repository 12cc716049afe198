"""`continuous_export`: decides every export. Each tick registers devices, reads every device's
checkpoint from Dagster's storage, and requests batched runs for the slices that are due, and
for closed device-days whose reconciliation failed (at day close, or by the late-data sweep).

The sensor's cursor remembers the checkpoints it has read, so a device silent for longer than the
searched window (a week, or the lookback) still resumes exactly where it stopped.
"""

import json
from datetime import UTC, datetime, timedelta

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from export_pipeline.checks import freshness_evaluation
from export_pipeline.jobs import export_due_slices, run_config_for
from export_pipeline.layout import DeviceIdError, validate_device_id
from export_pipeline.ledger import (
    busy_devices,
    checkpoint_dates,
    checkpoints_since,
    failed_reconciliations,
)
from export_pipeline.partitions import devices
from export_pipeline.planning import WorkItem, batches, due_work, first_due, with_reexports
from export_pipeline.resources import ClockResource, ExportResource, InfluxDBResource
from export_pipeline.settings import ExportSettings, Settings
from export_pipeline.slicing import NS_PER_SECOND, SECONDS_PER_DAY, DayRange, closed_until


def fleet_of(
    context: SensorEvaluationContext,
    influxdb: InfluxDBResource,
    config: ExportSettings,
    known: set[str],
    now: datetime,
) -> list[str]:
    """DEVICE_IDS, or every device InfluxDB has seen lately; unsafe ids are skipped, logged."""
    candidates = list(config.device_ids)
    if not candidates:
        since = int(first_due(now, config).timestamp()) * NS_PER_SECOND
        try:
            with influxdb.source() as source:
                candidates = source.device_ids(since)
        except Exception as error:
            context.log.warning(f"device discovery failed, using known devices: {error}")
            candidates = sorted(known)
    fleet = []
    for device_id in candidates:
        try:
            fleet.append(validate_device_id(device_id))
        except DeviceIdError as error:
            context.log.warning(f"skipped: {error}")
    return fleet


RESCAN_EVENTS = 50_000


def remembered(cursor: str | None) -> tuple[dict[str, datetime], int | None]:
    """The checkpoints and the newest storage id an earlier tick read."""
    state = json.loads(cursor) if cursor else {}
    values = state.get("checkpoints", {})
    done = {device: datetime.fromtimestamp(seconds, tz=UTC) for device, seconds in values.items()}
    return done, state.get("storage_id")


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
        fleet = fleet_of(context, influxdb, config, known, now)
        new = [device_id for device_id in fleet if device_id not in known]

        busy, dead = busy_devices(instance, timedelta(seconds=config.stale_run_after))
        for run_id in dead:
            context.log.warning(f"run {run_id} presumed dead and marked failed")
        done, seen = remembered(context.cursor)
        # A first tick (or a reset cursor) searches the whole window. Later ones read only the
        # materializations stored since (less a margin, for events committed out of id order):
        # over 30 days of history for 1,000 devices, a full search took 2.8 s.
        dates = checkpoint_dates(now, first_due(now, config), config.start_date)
        after = None if seen is None else max(0, seen - RESCAN_EVENTS)
        found, newest = checkpoints_since(instance, fleet, dates, after)
        newest = max(newest or 0, seen or 0) or None
        for device_id, through in found.items():
            done[device_id] = max(through, done.get(device_id, through))
        for device_id in sorted(set(fleet) & known - set(done)):
            context.log.warning(
                f"{device_id}: no checkpoint (never exported, or not since {dates[0]}); "
                "exporting from LOOKBACK_HOURS ago; materialize earlier device-days to fill in"
            )

        free = [device_id for device_id in fleet if device_id not in busy]
        until = closed_until(now, config.interval_seconds, config.lateness_seconds)
        closed_days = [day for day in dates if day < until.date()]
        # Every registered device, not only those seen lately: a device that came back online
        # may upload nothing but its buffer, which discovery since LOOKBACK_HOURS misses.
        registered = set(fleet) if config.device_ids else known | set(fleet)
        late = [
            WorkItem(device_id, DayRange(day, 0, SECONDS_PER_DAY), reexport=True)
            for device_id, day in failed_reconciliations(
                instance, sorted(registered - busy), closed_days
            )
        ]
        for item in late:
            context.log.warning(f"re-exporting {item.partition_key}: its reconciliation failed")
        work = with_reexports(due_work(free, done, now, config), late)
        instance.report_runless_asset_event(freshness_evaluation(done, fleet, now, config))
        requests = [
            RunRequest(
                run_key=f"{until.isoformat()}-batch-{index}",
                run_config=run_config_for(batch),
                tags={"export/through": until.isoformat()},
            )
            for index, batch in enumerate(batches(work, config.devices_per_run))
        ]
        context.log.info(
            f"{len(fleet)} devices ({len(new)} new, {len(busy)} busy): {len(work)} device-day "
            f"ranges due through {until.isoformat()} in {len(requests)} runs"
        )
        cursor = {
            "checkpoints": {device: moment.timestamp() for device, moment in done.items()},
            "storage_id": newest,
        }
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[devices.build_add_request(new)] if new else [],
            cursor=json.dumps(cursor, separators=(",", ":")),
        )

    return continuous_export
