"""`kvctl serve`: controller, codec worker and inference engine in one process.

The only command that imports the server package, and only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvctl.common.defaults import AUTH_TOKEN_ENV, CONFIG_FILE_ENV
from kvctl.errors import KvctlError, UsageError


def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar=CONFIG_FILE_ENV, dir_okay=False, metavar="FILE",
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
        envvar=AUTH_TOKEN_ENV, show_envvar=True, metavar="TOKEN", show_default=False,
        help="Require this bearer token on every port (prefer the environment variable: "
             "flags show in `ps`).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow a non-loopback --host without --auth-token.")] = False,
) -> None:
    """Run the controller, the codec worker and the inference engine in one process."""
    import logging

    from kvctl.server.config import ConfigError, build_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    overrides = {"host": host, "port": port, "monitor_port": monitor_port,
                 "engine_port": engine_port, "model": model, "codec_threads": codec_threads,
                 "auth_token": auth_token, "insecure": insecure or None,
                 "state": state, "embedded_worker": worker}
    try:
        settings = build_settings(config, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None

    from kvctl.server.errors import DomainError
    from kvctl.server.runner import run_stack
    from kvctl.server.storage import StorageError

    try:
        run_stack(settings, access_log=access_log)
    except (OSError, StorageError) as exc:
        raise KvctlError(str(exc)) from None
    except DomainError as exc:
        raise KvctlError(exc.detail) from None
