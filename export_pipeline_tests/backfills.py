"""Backfills as the UI launches them: a PartitionBackfill added to the instance, for the backfill
daemon of a real `dagster-daemon` to turn into runs (tests and benchmark P8)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from dagster import AssetKey, DagsterInstance
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.utils import make_new_backfill_id

from export_pipeline.defs.assets import build_telemetry_daily, build_telemetry_export
from export_pipeline.defs.partitions import closed_dates, device_days
from export_pipeline.settings import ExportSettings

DONE = {
    BulkActionStatus.COMPLETED,
    BulkActionStatus.COMPLETED_SUCCESS,
    BulkActionStatus.COMPLETED_FAILED,
    BulkActionStatus.FAILED,
    BulkActionStatus.CANCELED,
}


def submit_backfill(
    instance: DagsterInstance,
    asset_key: AssetKey,
    partition_keys: Sequence[str],
    settings: ExportSettings | None = None,
) -> str:
    """Add a backfill of `partition_keys` of `asset_key`, as the UI's "Launch backfill" does."""
    settings = settings or ExportSettings()
    graph = AssetGraph.from_assets(
        [
            build_telemetry_export(device_days(settings), settings),
            build_telemetry_daily(closed_dates(settings), settings),
        ]
    )
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=graph,
        partition_names=list(partition_keys),
        asset_selection=[asset_key],
        backfill_timestamp=time.time(),
        tags={},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=None,
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def wait_for_backfill(instance: DagsterInstance, backfill_id: str, timeout: float) -> str:
    """The backfill's final status, once the daemon has finished it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backfill = instance.get_backfill(backfill_id)
        if backfill is not None and backfill.status in DONE:
            return backfill.status.value
        time.sleep(1)
    raise TimeoutError(f"backfill {backfill_id} not done within {timeout:.0f} s")
