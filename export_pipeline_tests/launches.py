"""Runs created and launched as the daemon's run queue launches them (`instance.launch_run`,
through the instance's DefaultRunLauncher), on a code server reached over its socket: the path a
run takes in the docker-compose stack and `scripts/run`. Used by the code server's tests and by
benchmark P2."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import psutil
from dagster import DagsterInstance, DagsterRun
from dagster._cli.job import _create_run
from dagster._cli.workspace.cli_target import (
    get_remote_job_from_remote_repo,
    get_remote_repository_from_code_location,
)
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import GrpcServerTarget

from export_pipeline.code_server import LOCATION_NAME
from export_pipeline_tests.services import CodeServer


class Launches:
    """Launch runs of the code server's jobs from this process, as the daemon would."""

    def __init__(self, instance: DagsterInstance, server: CodeServer) -> None:
        self.instance, self.server = instance, server
        self.context = WorkspaceProcessContext(
            instance,
            GrpcServerTarget(
                host="localhost", port=None, socket=server.socket, location_name=LOCATION_NAME
            ),
        )

    def __enter__(self) -> Launches:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.context.__exit__(kind, error, tb)

    def launch(self, job_name: str, run_config: dict[str, Any]) -> DagsterRun:
        """Create a run of `job_name` and launch it; it runs in the code server's forkserver."""
        workspace = self.context.create_request_context()
        location = workspace.get_code_location(LOCATION_NAME)
        repository = get_remote_repository_from_code_location(location, None)
        job = get_remote_job_from_remote_repo(repository, job_name)
        run = _create_run(
            instance=self.instance,
            code_location=location,
            remote_repo=repository,
            remote_job=job,
            run_config=run_config,
            tags={},
            op_selection=None,
            run_id=None,
        )
        return self.instance.launch_run(run.run_id, workspace)

    def run_processes(self) -> list[psutil.Process]:
        """The processes of the runs in progress: the forkserver's children."""
        return [
            child for forkserver in self.server.forkservers() for child in forkserver.children()
        ]

    def wait(self, run: DagsterRun, timeout: float = 120.0) -> DagsterRun:
        """The run once it has ended (`is_finished`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.instance.get_run_by_id(run.run_id)
            if found is not None and found.is_finished:
                return found
            time.sleep(0.2)
        raise AssertionError(f"run {run.run_id} did not end within {timeout:.0f} s")
