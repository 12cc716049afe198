"""`continuous_export`: decides every export. Each tick reads a snapshot (the fleet, the ledger,
the runs in flight), reaps dead runs, and acts on the plan `planning.plan_tick` makes of it:
new devices registered, batched runs for the slices that are due and for closed device-days whose
reconciliation failed, day files for closed device-days, the freshness check reported, the
`reconciled` summaries when they change, and the dates of telemetry_daily that a day-files run
which died left unrecorded."""

from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from export_pipeline.defs.continuous import (
    bring_record_current,
    date_materializations,
    export_day_files,
    export_days,
    export_due_slices,
    export_slices,
)
from export_pipeline.defs.partitions import devices
from export_pipeline.defs.planning import (
    SensorCursor,
    Snapshot,
    admit,
    closed_window,
    discover,
    first_due,
    plan_tick,
    ready_at,
    registered,
    tick_seconds,
)
from export_pipeline.defs.resources import (
    ClockResource,
    ExportBucketResource,
    ExportResource,
    InfluxDBResource,
)
from export_pipeline.defs.run_config import run_config_for
from export_pipeline.defs.runs import (
    CONTINUOUS_JOB,
    DAILY,
    DAILY_JOB,
    SLICES,
    busy_devices,
    is_dead,
    reap_dead_runs,
    run_slots,
    runs_in_flight,
)
from export_pipeline.engine.grid import NS_PER_SECOND
from export_pipeline.record.keys import (
    DAILY_RECONCILIATION,
    DEVICES,
    RECONCILIATION,
    TELEMETRY_DAILY,
)
from export_pipeline.record.ledger import latest_checks, progress_of, recorded_dates
from export_pipeline.record.versions import RECORD_VERSION
from export_pipeline.settings import Settings


class LoggedOnce:
    """The ids whose refusal this process has logged, so each is logged once, not every tick
    (until the code server restarts, or `most` later refusals push it out): a writer of
    arbitrary tag values would otherwise fill the log."""

    def __init__(self, most: int = 10_000) -> None:
        self.most = most
        self.logged: OrderedDict[str, None] = OrderedDict()

    def first_time(self, refused: Mapping[str, str]) -> list[str]:
        """The messages of the ids not logged before, and a count of the others."""
        new = [message for key, message in refused.items() if key not in self.logged]
        for key in refused:
            self.logged[key] = None
            self.logged.move_to_end(key)
        while len(self.logged) > self.most:
            self.logged.popitem(last=False)
        again = len(refused) - len(new)
        return new + ([f"{again:,} device ids refused as before"] if again else [])


def build_continuous_export(settings: Settings) -> SensorDefinition:
    refusals = LoggedOnce()

    @sensor(
        name="continuous_export",
        jobs=[export_due_slices, export_day_files],
        minimum_interval_seconds=tick_seconds(settings.export),
        default_status=DefaultSensorStatus.RUNNING,
    )
    def continuous_export(
        context: SensorEvaluationContext,
        influxdb: InfluxDBResource,
        s3: ExportBucketResource,
        export: ExportResource,
        clock: ClockResource,
    ) -> SensorResult:
        config, now, instance = export.settings(), clock.now(), context.instance
        reported = SensorCursor.of(context.cursor)
        if reported.record != RECORD_VERSION:
            for note in bring_record_current(instance, s3, config):
                context.log.info(note)
        known = frozenset(instance.get_dynamic_partitions(DEVICES))
        bounds: list[str] = []
        if config.device_ids:
            fleet, refused = admit(config.device_ids)
        else:
            since = int(first_due(now, config).timestamp()) * NS_PER_SECOND
            try:
                with influxdb.source() as source:
                    candidates = source.device_ids(since)
            except Exception as error:
                context.log.warning(f"device discovery failed, using known devices: {error}")
                candidates = sorted(known)
            found = discover(candidates, known, config)
            fleet, refused, bounds = found.fleet, found.refused, found.warnings(config)
        skipped = refusals.first_time(refused) + bounds

        stale = timedelta(seconds=config.stale_run_after)
        runs, wall = runs_in_flight(instance), datetime.now(UTC)
        dead = [run for run in runs if is_dead(run, wall, stale)]
        reap_dead_runs(instance, dead, stale)
        for run in dead:
            context.log.warning(f"run {run.run.run_id} presumed dead and marked failed")
        live = [run for run in runs if run not in dead]

        fleet_ever = sorted(registered(fleet, known, config))
        closed = closed_window(now, config)
        snapshot = Snapshot(
            fleet=fleet,
            known=known,
            progress=progress_of(instance, fleet),
            slice_checks=latest_checks(instance, RECONCILIATION, fleet_ever, closed),
            day_checks=latest_checks(instance, DAILY_RECONCILIATION, fleet_ever, closed),
            busy=frozenset(busy_devices(live, SLICES)),
            busy_days=frozenset(busy_devices(live, DAILY)),
            closed=closed,
            dates_recorded=recorded_dates(instance, TELEMETRY_DAILY, closed),
            run_slots=run_slots(instance),
        )
        plan = plan_tick(now, config, snapshot, ahead=tick_seconds(config))

        for warning in skipped + plan.warnings:
            context.log.warning(warning)
        cursor = plan.cursor()._replace(record=RECORD_VERSION)
        if reported.until != cursor.until:
            instance.report_runless_asset_event(plan.freshness)
        if reported.summaries != cursor.summaries:
            for summary in plan.reconciled:
                instance.report_runless_asset_event(summary)
        for event in date_materializations(instance, s3, config, plan.dates):
            instance.report_runless_asset_event(event)
        context.log.info(plan.summary)
        return SensorResult(
            run_requests=[
                RunRequest(
                    run_key=f"{plan.until.isoformat()}-batch-{index}",
                    job_name=CONTINUOUS_JOB,
                    run_config=run_config_for(
                        batch, export_slices.name, not_before=ready_at(batch, config)
                    ),
                    tags={"export/through": plan.until.isoformat()},
                )
                for index, batch in enumerate(plan.runs)
            ]
            + [
                RunRequest(
                    run_key=f"{plan.until.isoformat()}-days-{index}",
                    job_name=DAILY_JOB,
                    run_config=run_config_for(batch, export_days.name),
                )
                for index, batch in enumerate(plan.day_runs)
            ],
            dynamic_partitions_requests=(
                [devices.build_add_request(plan.new_devices)] if plan.new_devices else []
            ),
            cursor=cursor.text,
        )

    return continuous_export
