"""`kvctl worker`: one instance as a process of its own, registered with a controller."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvctl.errors import KvctlError, UsageError


def worker(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="LMCACHE_CONFIG_FILE",
            dir_okay=False,
            help="LMCache-style YAML config: lmcache_instance_id, controller_url (the "
            "controller's monitor port), lmcache_worker_port, storage tiers.",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            metavar="HOST", show_default=False, help="Address to bind. \\[default: 127.0.0.1]"
        ),
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(
            metavar="HOST",
            show_default=False,
            help="Host the controller and other workers reach this one at. \\[default: "
            "--host, or for 0.0.0.0 this machine's address towards the controller]",
        ),
    ] = None,
    worker_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            show_default=False,
            help="Port of the controller's commands. \\[default: lmcache_worker_port(s)]",
        ),
    ] = None,
    engine_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            show_default=False,
            help="Inference engine port (OpenAI API). \\[default: 8000]",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            show_default=False,
            help="Engine model: smollm2, a local directory or .gguf file, or 'none'. "
            "\\[default: smollm2]",
        ),
    ] = None,
    instance_id: Annotated[
        str | None,
        typer.Option(
            metavar="ID", show_default=False, help="Instance id. \\[default: lmcache_instance_id]"
        ),
    ] = None,
    controller: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            show_default=False,
            help="Controller address(es), host:port, comma-separated. \\[default: controller_url]",
        ),
    ] = None,
    codec_threads: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            show_default=False,
            help="Codec jobs run at once, each in a process of its own. \\[default: 1]",
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every HTTP request.")
    ] = False,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="KVCTL_AUTH_TOKEN",
            show_envvar=True,
            metavar="TOKEN",
            show_default=False,
            help="Require this bearer token, and present it to the controller (one token for "
            "the cluster; prefer the environment variable).",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback --host without --auth-token.")
    ] = False,
) -> None:
    """Run one instance (store, codec pool, engine) that a `kvctl serve` controller routes to."""
    import logging

    from kvctl.server.config import ConfigError, build_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    # one line per heartbeat would bury everything else
    logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides = {
        "host": host,
        "advertise_host": advertise_host,
        "lmcache_worker_port": worker_port,
        "engine_port": engine_port,
        "model": model,
        "lmcache_instance_id": instance_id,
        "controller_url": controller,
        "codec_threads": codec_threads,
        "auth_token": auth_token,
        "insecure": insecure or None,
    }
    if worker_port is not None:
        overrides["lmcache_worker_ports"] = worker_port
    if controller is not None:
        overrides["controller_pull_url"] = controller
    try:
        settings = build_settings(config, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None

    from kvctl.server.runner import run_worker
    from kvctl.server.storage import StorageError

    try:
        run_worker(settings, access_log=access_log)
    except (OSError, StorageError, ValueError) as exc:
        raise KvctlError(str(exc)) from None
