"""The pipeline's code server, whose runs start from a warm process:
`python -m export_pipeline.code_server --socket PATH` (or `--host H --port P`).

Dagster's own code server (`dagster api grpc`, `dagster code-server start`) starts each run in a
fresh interpreter (multiprocessing's "spawn"): the run imports Dagster, pyarrow and this package
and builds its definitions again, about 2 s of CPU before it exports anything, every run, every
tick (bench P2, P12). This server is Dagster's, with one difference: its runs are forked from a
process that imported all of that once when the server started (multiprocessing's "forkserver",
whose server process imports `export_pipeline.warm`). A run still gets a process of its own,
started and watched by Dagster's server as before: its termination, its events, its failure when
the process dies, and the daemon's launcher (DefaultRunLauncher) are unchanged.

The forkserver holds the code (and the partition window) as the server loaded them at its start:
a new version of the code takes a restart of this server (docker-compose recreates its container),
and so does moving the window (docs/operations.md, "The partition window"). A forkserver that dies
is started again by the next run's launch; the runs it had forked go on (`RunProcess`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any

from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import FuturesAwareThreadPoolExecutor
from dagster._grpc.server import DagsterApiServer, DagsterGrpcServer
from dagster._utils.interrupts import setup_interrupt_handlers
from dagster._utils.log import configure_loggers

from export_pipeline.settings import LOG_LEVELS, load_env_file

MODULE = "export_pipeline.definitions"
LOCATION_NAME = "export_pipeline"  # as the workspace files name it
WARM_MODULE = "export_pipeline.warm"  # what the forkserver imports before forking any run
FORKSERVER_LOST = 255  # the exit code multiprocessing reports when the forkserver's pipe closed
log = logging.getLogger("export_pipeline.code_server")


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class RunProcess(ForkServerProcess):
    """A run's process, forked by the forkserver. The server learns that it ended through a pipe
    the forkserver holds: a forkserver that dies (SIGTERM to the server's process group, the OOM
    killer) closes every such pipe, which reads as the exit of every run in flight (code 255),
    and Dagster's server would then fail runs that are still exporting, whose devices the sensor
    would hand to new runs. So such an exit is believed only once the process itself is gone."""

    def is_alive(self) -> bool:
        if super().is_alive():
            return True
        return self.exitcode == FORKSERVER_LOST and self.pid is not None and running(self.pid)


class WarmContext(ForkServerContext):
    """multiprocessing's forkserver context, whose processes are `RunProcess`es."""

    Process = RunProcess


class WarmApiServer(DagsterApiServer):
    """Dagster's gRPC API server, starting its runs from the forkserver (Dagster's starts them
    with "spawn": a new interpreter each). The forkserver is started with the server, so the
    first run does not wait for its imports either."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        context = WarmContext()
        context.set_forkserver_preload([WARM_MODULE])
        forkserver.ensure_running()
        self._mp_ctx = context  # type: ignore[assignment]  # what StartRun starts runs with


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="serve on this Unix socket")
    where.add_argument("--port", type=int, help="serve on this TCP port (with --host)")
    parser.add_argument("--host", default="localhost", help="the address to listen on")
    parser.add_argument("--module", default=MODULE, help="the module holding the definitions")
    parser.add_argument("--location-name", default=LOCATION_NAME)
    parser.add_argument("--max-workers", type=int, default=None, help="gRPC threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    load_env_file()
    # Dagster maps SIGTERM to SIGINT's handler: a parent that ignores SIGINT (a shell's
    # background job, a test runner's worker) would have SIGTERM ignored too, by this server, its
    # forkserver and its runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_interrupt_handlers()
    level = os.environ.get("LOG_LEVEL", "").upper()
    level = level if level in LOG_LEVELS else "INFO"
    configure_loggers(log_level=level)  # Dagster's loggers
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("export_pipeline").setLevel(level)
    where = f"socket {args.socket}" if args.socket else f"{args.host}:{args.port}"
    termination = threading.Event()
    threads = FuturesAwareThreadPoolExecutor(max_workers=args.max_workers)
    servicer = WarmApiServer(
        server_termination_event=termination,
        logger=log,
        server_threadpool_executor=threads,
        loadable_target_origin=LoadableTargetOrigin(
            executable_path=sys.executable,
            module_name=args.module,
            working_directory=os.getcwd(),
        ),
        location_name=args.location_name,
    )
    server = DagsterGrpcServer(
        server_termination_event=termination,
        dagster_api_servicer=servicer,
        logger=log,
        threadpool_executor=threads,
        host=args.host,
        port=args.port,
        socket=args.socket,
    )
    log.info("code server for %s on %s, runs forked from warm processes", args.module, where)
    try:
        server.serve()
    except KeyboardInterrupt:
        log.info("code server interrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
