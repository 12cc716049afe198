"""Imported once by the code server's forkserver (`code_server.py`), before it forks any run:
what every run would otherwise import and build again, at the cost of a few seconds of CPU."""

import dagster._grpc.impl  # noqa: F401  (the run's entry point, start_run_in_subprocess)
import dagster_postgres  # noqa: F401  (the instance's storage)
import psycopg2  # noqa: F401

from export_pipeline.definitions import defs

defs.get_repository_def()
