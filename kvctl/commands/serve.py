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
    ModelOpt,
    run_server,
    settings_for,
)
from kvctl.errors import UsageError


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
    coordinator_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Also serve LMCache's MP coordinator API here (`lmcache server "
             "--coordinator-url http://HOST:PORT`; LMCache's default port is 9300). "
             "\\[default: off]")] = None,
    coordinator_allow: Annotated[list[str] | None, typer.Option(
        metavar="ADDRESS", show_default=False,
        help="An address or network (repeatable) whose MP servers may register and post "
             "events, besides loopback. \\[default: loopback only]")] = None,
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
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow a non-loopback --host without --auth-token, and a "
                           "non-loopback --monitor-host.")] = False,
    monitor_ports: Annotated[str | None, typer.Option(
        metavar="JSON", show_default=False,
        help='LMCache 0.5.6 fleets: bind the controller sockets their LMCacheWorkers use, '
             'as lmcache_controller does: \'{"pull": 8300, "reply": 8400, "heartbeat": '
             '8500}\' (pull/reply default to 8300/8400, heartbeat to a free port). LMCache '
             'workers cannot authenticate: anyone who reaches these ports can register a '
             'worker and feed the directory /lookup answers from, so they bind loopback '
             '(see --monitor-host). \\[default: not bound]')] = None,
    monitor_host: Annotated[str | None, typer.Option(
        metavar="ADDRESS", show_default=False,
        help="Address the LMCache sockets bind; anything but loopback needs --insecure "
             "(no authentication on them). \\[default: 127.0.0.1]")] = None,
    health_check_interval: Annotated[int | None, typer.Option(
        hidden=True, help="lmcache_controller's flag, accepted; kvctl tracks liveness from "
                          "heartbeats (dead after dead_after_s)")] = None,
    lmcache_worker_timeout: Annotated[int | None, typer.Option(
        hidden=True, help="lmcache_controller's flag, accepted; see --health-check-interval")
    ] = None,
) -> None:
    """Run the controller, the codec worker and the inference engine in one process.

    As a drop-in for LMCache 0.5.6's lmcache_controller: kvctl serve --no-worker --model none
    --host H --port P --monitor-ports '{"pull": A, "reply": B, "heartbeat": C}'.
    """
    settings = settings_for(config, {
        "host": host, "port": port, "monitor_port": monitor_port, "engine_port": engine_port,
        "model": model, "codec_threads": codec_threads, "auth_token": auth_token,
        "insecure": insecure or None, "state": state, "embedded_worker": worker,
        "lmcache_monitor_ports": monitor_ports, "lmcache_monitor_host": monitor_host,
        "coordinator_port": coordinator_port, "coordinator_allow": coordinator_allow or None})
    from kvctl.server.http.auth import is_loopback

    if (settings.lmcache_monitor_ports is not None
            and not is_loopback(settings.lmcache_monitor_host) and not settings.insecure):
        raise UsageError(f"--monitor-host {settings.lmcache_monitor_host}: LMCache workers "
                         "cannot authenticate, so anyone who reaches the LMCache sockets can "
                         "register workers and feed the directory; pass --insecure to bind "
                         "them beyond loopback anyway (behind a firewall)")
    from kvctl.server.runner import run_stack

    run_server(run_stack, settings, access_log)
