"""`kvctl worker`: one instance as a process of its own, registered with a controller."""

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


def worker(
    config: ConfigOpt = None,
    host: HostOpt = None,
    advertise_host: Annotated[str | None, typer.Option(
        metavar="HOST", show_default=False,
        help="Host the controller and other workers reach this one at. \\[default: --host, "
             "or for 0.0.0.0 this machine's address towards the controller]")] = None,
    worker_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Port of the controller's commands. \\[default: lmcache_worker_port(s)]")
    ] = None,
    engine_port: EnginePortOpt = None,
    model: ModelOpt = None,
    instance_id: Annotated[str | None, typer.Option(
        metavar="ID", show_default=False,
        help="Instance id. \\[default: lmcache_instance_id]")] = None,
    controller: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", show_default=False,
        help="Controller address(es): the monitor port, host:port, comma-separated. "
             "\\[default: controller_url]")] = None,
    codec_threads: CodecThreadsOpt = None,
    access_log: AccessLogOpt = False,
    auth_token: AuthTokenOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run one instance (store, codec pool, engine) that a `kvctl serve` controller routes to."""
    overrides = {
        "host": host, "advertise_host": advertise_host, "lmcache_worker_port": worker_port,
        "engine_port": engine_port, "model": model, "lmcache_instance_id": instance_id,
        "controller_url": controller, "codec_threads": codec_threads,
        "auth_token": auth_token, "insecure": insecure or None}
    if worker_port is not None:
        overrides["lmcache_worker_ports"] = worker_port
    if controller is not None:
        overrides["controller_pull_url"] = controller
    settings = settings_for(config, overrides)
    from kvctl.server.runner import run_worker

    run_server(run_worker, settings, access_log)
