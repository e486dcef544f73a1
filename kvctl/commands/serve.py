"""`kvctl serve`: controller, codec worker and inference engine in one process.

The only command that imports the server package, and only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvctl.errors import KvctlError, UsageError


def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar="LMCACHE_CONFIG_FILE", dir_okay=False, metavar="FILE",
        show_default=False,
        help="LMCache-style YAML config (both seed files work unchanged); flags win over it. "
             "\\[default: none, built-in settings]")] = None,
    host: Annotated[str | None, typer.Option(
        metavar="ADDRESS", show_default=False,
        help="Address to bind; anything but loopback needs --auth-token (or --insecure). "
             "\\[default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False, help="Controller port. \\[default: 9000]")] = None,
    monitor_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Monitor port (metrics, events; where `kvctl worker` registers). "
             "\\[default: 9001]")] = None,
    engine_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Inference engine port (OpenAI API). \\[default: 8000]")] = None,
    model: Annotated[str | None, typer.Option(
        metavar="MODEL", show_default=False,
        help="Engine model: smollm2 or gemma3 (embedded), a local directory or .gguf file, "
             "or 'none' for no engine. \\[default: smollm2]")] = None,
    coordinator_port: Annotated[int | None, typer.Option(
        metavar="PORT", show_default=False,
        help="Also serve LMCache's MP coordinator API here (`lmcache server "
             "--coordinator-url http://HOST:PORT`; LMCache's default port is 9300). "
             "\\[default: off]")] = None,
    coordinator_allow: Annotated[list[str] | None, typer.Option(
        metavar="ADDRESS", show_default=False,
        help="An address or network (repeatable) whose MP servers may register and post "
             "events, besides loopback. \\[default: loopback only]")] = None,
    codec_threads: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help="Codec jobs run at once, each in a process of its own. \\[default: 1]")
    ] = None,
    state: Annotated[str | None, typer.Option(
        metavar="URL", show_default=False,
        help="redis://HOST:PORT\\[/DB]: keep events and the worker registry in Redis, shared "
             "by every controller that names it. \\[default: in memory]")] = None,
    worker: Annotated[bool | None, typer.Option(
        "--worker/--no-worker", show_default=False,
        help="Run an instance (store, codecs, engine) in this process; --no-worker makes a "
             "pure controller for `kvctl worker` processes. \\[default: --worker]")] = None,
    access_log: Annotated[bool, typer.Option(
        "--access-log", help="Log every HTTP request.")] = False,
    auth_token: Annotated[str | None, typer.Option(
        envvar="KVCTL_AUTH_TOKEN", show_envvar=True, metavar="TOKEN", show_default=False,
        help="Require this bearer token on every port (prefer the environment variable: "
             "flags show in `ps`).")] = None,
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
    import logging

    from kvctl.server.config import ConfigError, build_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    overrides = {"host": host, "port": port, "monitor_port": monitor_port,
                 "engine_port": engine_port, "model": model, "codec_threads": codec_threads,
                 "auth_token": auth_token, "insecure": insecure or None,
                 "state": state, "embedded_worker": worker,
                 "lmcache_monitor_ports": monitor_ports, "lmcache_monitor_host": monitor_host,
                 "coordinator_port": coordinator_port,
                 "coordinator_allow": coordinator_allow or None}
    try:
        settings = build_settings(config, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    from kvctl.server.http.auth import is_loopback

    if (settings.lmcache_monitor_ports is not None
            and not is_loopback(settings.lmcache_monitor_host) and not settings.insecure):
        raise UsageError(f"--monitor-host {settings.lmcache_monitor_host}: LMCache workers "
                         "cannot authenticate, so anyone who reaches the LMCache sockets can "
                         "register workers and feed the directory; pass --insecure to bind "
                         "them beyond loopback anyway (behind a firewall)")

    from kvctl.server.errors import DomainError
    from kvctl.server.runner import run_stack
    from kvctl.server.storage import StorageError

    try:
        run_stack(settings, access_log=access_log)
    except (OSError, StorageError) as exc:
        raise KvctlError(str(exc)) from None
    except DomainError as exc:
        raise KvctlError(exc.detail) from None
