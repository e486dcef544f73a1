"""`kvctl serve`: controller, codec worker and inference engine in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar="LMCACHE_CONFIG_FILE", dir_okay=False,
        help="LMCache-style YAML config (both seed files work unchanged).")] = None,
    host: Annotated[str | None, typer.Option(
        help="Address to bind. Default 127.0.0.1; anything else needs --auth-token (or "
             "--insecure).")] = None,
    port: Annotated[int | None, typer.Option(help="Controller port. [default: 9000]")] = None,
    monitor_port: Annotated[int | None, typer.Option(
        help="Monitor port (metrics, events). [default: 9001]")] = None,
    engine_port: Annotated[int | None, typer.Option(
        help="Inference engine port (OpenAI API). [default: 8000]")] = None,
    model: Annotated[str | None, typer.Option(
        help="Engine model: smollm2 (embedded), a local directory or .gguf file, or 'none' for "
             "no engine. [default: smollm2]")] = None,
    codec_threads: Annotated[int | None, typer.Option(
        help="Codec jobs run at once. [default: 1]")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
    auth_token: Annotated[str | None, typer.Option(
        envvar="KVCTL_AUTH_TOKEN", show_envvar=True,
        help="Require this bearer token on every port (prefer the environment variable: "
             "flags show in `ps`).")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Allow a non-loopback --host without --auth-token.")] = False,
) -> None:
    """Run the controller, the codec worker and the inference engine in one process."""
    import logging

    from kvctl.server.config import ConfigError, build_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    overrides = {"host": host, "port": port, "monitor_port": monitor_port,
                 "engine_port": engine_port, "model": model, "codec_threads": codec_threads,
                 "auth_token": auth_token, "insecure": insecure or None}
    try:
        settings = build_settings(config, overrides)
    except ConfigError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None

    from kvctl.server.runner import run_stack
    from kvctl.server.storage import StorageError

    try:
        run_stack(settings, access_log=access_log)
    except (OSError, StorageError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
