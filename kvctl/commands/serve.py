"""`kvctl serve`: controller, codec worker and inference engine in one process.

The only command, with `kvctl worker`, that imports the server package, and only when it
runs (kvctl/commands/_server.py).
"""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl.commands._server import (
    AccessLogOpt,
    AuthTokenOpt,
    CodecThreadsOpt,
    ConfigOpt,
    EnginePortOpt,
    HostOpt,
    InsecureOpt,
    ModelOpt,
    run_server,
    settings_for,
)


def serve(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False, help="Controller port. \\[default: 9000]")] = None,
    monitor_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Monitor port (metrics, events; where `kvctl worker` registers). "
             "\\[default: 9001]")] = None,
    engine_port: EnginePortOpt = None,
    model: ModelOpt = None,
    codec_threads: CodecThreadsOpt = None,
    state: Annotated[str | None, typer.Option(
        metavar="URL", show_default=False,
        help="redis://HOST:PORT\\[/DB]: keep events and the worker registry in Redis, shared "
             "by every controller that names it. \\[default: in memory]")] = None,
    worker: Annotated[bool | None, typer.Option(
        "--worker/--no-worker", show_default=False,
        help="Run an instance (store, codecs, engine) in this process; --no-worker makes a "
             "pure controller for `kvctl worker` processes. \\[default: --worker]")] = None,
    access_log: AccessLogOpt = False,
    auth_token: AuthTokenOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run the controller, the codec worker and the inference engine in one process."""
    settings = settings_for(config, {
        "host": host, "port": port, "monitor_port": monitor_port, "engine_port": engine_port,
        "model": model, "codec_threads": codec_threads, "auth_token": auth_token,
        "insecure": insecure or None, "state": state, "embedded_worker": worker})
    from kvctl.server.runner import run_stack

    run_server(run_stack, settings, access_log)
