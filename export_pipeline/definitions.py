"""The code location: `dagster ... -m export_pipeline.definitions`."""

from dagster import Definitions

from export_pipeline.assets import telemetry_export
from export_pipeline.jobs import register_devices
from export_pipeline.resources import build_resources
from export_pipeline.settings import Settings

defs = Definitions(
    assets=[telemetry_export],
    jobs=[register_devices],
    resources=build_resources(Settings.from_env()),
)
