"""What `kvctl serve` and `kvctl worker` share: their common options, declared once, and
the one place that turns a failing start into a one-line error.

The server package is imported only when one of them runs (the CLI reaches servers over
HTTP otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvctl.common.defaults import AUTH_TOKEN_ENV, CONFIG_FILE_ENV, DEFAULT_MODEL
from kvctl.errors import KvctlError, UsageError

if TYPE_CHECKING:
    from kvctl.server.config import ServerSettings

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar=CONFIG_FILE_ENV, dir_okay=False, metavar="FILE",
    show_default=False,
    help="LMCache-style YAML config (LMCache's keys work unchanged); flags win over it. "
         "\\[default: none, built-in settings]")]
HostOpt = Annotated[str | None, typer.Option(
    metavar="ADDRESS", show_default=False,
    help="Address to bind; anything but loopback needs --auth-token (or --insecure). "
         "\\[default: 127.0.0.1]")]
EnginePortOpt = Annotated[int | None, typer.Option(
    metavar="PORT", show_default=False,
    help="Inference engine port (OpenAI API). \\[default: 8000]")]
ModelOpt = Annotated[str | None, typer.Option(
    metavar="MODEL", show_default=False,
    help="Engine model: smollm2 or gemma3 (embedded), a local directory or .gguf file, "
         f"or 'none' for no engine. \\[default: {DEFAULT_MODEL}]")]
CodecThreadsOpt = Annotated[int | None, typer.Option(
    metavar="N", show_default=False,
    help="Codec jobs run at once, each in a process of its own. \\[default: 1]")]
AccessLogOpt = Annotated[bool, typer.Option("--access-log", help="Log every HTTP request.")]
AuthTokenOpt = Annotated[str | None, typer.Option(
    envvar=AUTH_TOKEN_ENV, show_envvar=True, metavar="TOKEN", show_default=False,
    help="Require this bearer token on every port; a worker also presents it to the "
         "controller (one token for the cluster). Prefer the environment variable: flags "
         "show in `ps`.")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="Allow a non-loopback --host without --auth-token.")]


def settings_for(config: Path | None, overrides: dict[str, Any]) -> ServerSettings:
    """The server's settings from its config file and the flags given (None: not given);
    a bad file or value is a usage error naming the key."""
    import logging

    from kvctl.server.config import ConfigError, build_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    # one line per heartbeat or controller call would bury everything else
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return build_settings(config, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def run_server(run: Callable[..., None], settings: ServerSettings, access_log: bool) -> None:
    """Serve until stopped; what stops the start (a busy port, a missing Redis, an exposed
    address without a token, a worker without a controller) is one line, exit 1."""
    from kvctl.server.errors import DomainError
    from kvctl.server.storage import StorageError

    try:
        run(settings, access_log=access_log)
    except DomainError as exc:
        raise KvctlError(exc.detail) from None
    except (OSError, StorageError, ValueError) as exc:
        raise KvctlError(str(exc)) from None
