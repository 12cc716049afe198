"""The one run driver: a run's devices exported and recorded as they finish."""

import time
from collections.abc import Mapping

from dagster import (
    AssetMaterialization,
    Failure,
    OpExecutionContext,
)

from export_pipeline.defs.resources import (
    ClockResource,
)
from export_pipeline.defs.runs import (
    HEARTBEAT_SECONDS,
    mark_process,
)
from export_pipeline.engine.dataset import Dataset
from export_pipeline.engine.export import DeviceOutcome, DeviceWork, export_fleet
from export_pipeline.engine.progress import Progress
from export_pipeline.record.events import (
    materialization,
    reconciliation_evaluation,
    worth_recording,
)
from export_pipeline.record.keys import DatasetRecord
from export_pipeline.record.ledger import record_progress
from export_pipeline.record.storage import (
    log_materializations,
    pool_storage_connections,
)
from export_pipeline.settings import ExportSettings


def run_exports(
    context: OpExecutionContext,
    dataset: Dataset,
    work: Mapping[str, DeviceWork],
    *,
    record: DatasetRecord,
    settings: ExportSettings,
    clock: ClockResource,
    every_range: bool = False,
    retry: str = "what they left is requested again on the next tick",
) -> None:
    """Export the run's work, `EXPORT_CONCURRENCY` devices at a time, and record it as devices
    finish (`record`: how the dataset is filed): a materialization of each range worth one
    (`worth_recording`, or every range: `every_range`, as an asset run's partitions need), an
    evaluation for every day that closed, and each device's new progress; stored in batches,
    with every heartbeat and at the end. Every run of every dataset goes through here, the
    assets' and the continuous jobs': a failing device does not hold back the others, what
    finished is recorded, and the run fails at the end naming each failure (`retry`: what
    becomes of it). The heartbeat lets the sensor tell a slow run from a dead one."""
    mark_process(context.instance, context.run.run_id)
    pool_storage_connections(context.instance)  # a run records an event per device-day
    failures: list[str] = []
    materializations: list[AssetMaterialization] = []
    progress: dict[str, Progress] = {}
    stored = float("-inf")  # the first device to finish is stored at once
    asset_key, every_range = record.asset_key, every_range or not record.keeps_progress

    def store() -> None:
        nonlocal stored
        log_materializations(context, materializations)
        materializations.clear()
        if record.keeps_progress:
            record_progress(context.instance, progress)
        progress.clear()
        stored = time.monotonic()

    def on_outcome(outcome: DeviceOutcome) -> None:
        device_id, previous = outcome.device_id, work[outcome.device_id].progress
        for exported in outcome.exported:
            if asset_key is not None and (
                every_range or worth_recording(exported, previous, settings.interval_seconds)
            ):
                materializations.append(materialization(exported, clock.now(), asset_key))
            previous = exported.progress or previous
            if previous is not None:
                progress[device_id] = previous
        for result in outcome.reconciliations:
            # log_event records check evaluations too; its type hint is narrower.
            context.log_event(reconciliation_evaluation(result, record.check))  # type: ignore[arg-type]
        for error in outcome.errors:
            context.log.error(f"{device_id}: {error}")
            failures.append(f"{device_id}: {error}")
        if len(materializations) >= 1000 or time.monotonic() - stored >= 1:
            store()  # in batches: a round trip per device would cost seconds a tick

    def heartbeat(done: int) -> None:
        store()
        context.log.info(f"exporting: {done} of {len(work)} devices done")

    def on_retry(error: BaseException, delay: float) -> None:
        context.log.warning(f"retrying in {delay:.1f} s after a transient error: {error}")

    try:
        export_fleet(
            dataset,
            work,
            first_due=clock.now(),
            retries=settings.retries,
            concurrency=settings.concurrency,
            heartbeat_seconds=HEARTBEAT_SECONDS,
            on_outcome=on_outcome,
            on_heartbeat=heartbeat,
            on_retry=on_retry,
        )
    finally:
        store()  # what finished is kept, also when the run is stopped
    if failures:
        raise Failure(
            f"{len(failures)} errors in {len(work)} devices (the others are done); {retry}: "
            + "; ".join(failures[:20])
        )
