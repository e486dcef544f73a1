"""CLI settings: flag > environment (KVCTL_*) > config file > built-in default.

The config file is ``<user config dir>/kvctl/config.yaml`` (``typer.get_app_dir``), or the
file named by ``KVCTL_CONFIG``; keys: controller, timeout, tokenizer, instance_id,
auth_token, coordinator. The token has no flag (a flag shows in `ps`) and is never printed.
`resolve` reads the file once and records where each value came from (`kvctl config show`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvctl.common.defaults import (
    AUTH_TOKEN_ENV,
    CONTROLLER_ENV,
    COORDINATOR_ENV,
    DEFAULT_CONTROLLER,
    DEFAULT_INSTANCE_ID,
    DEFAULT_LOCATION,
    DEFAULT_METHOD,
    DEFAULT_TIMEOUT,
    DEFAULT_TOKENIZER,
    INSTANCE_ID_ENV,
    SETTINGS_FILE_ENV,
    TIMEOUT_ENV,
    TOKENIZER_ENV,
    env,
)
from kvctl.errors import KvctlError, UsageError

__all__ = ["DEFAULT_CONTROLLER", "DEFAULT_INSTANCE_ID", "DEFAULT_LOCATION", "DEFAULT_METHOD",
           "DEFAULT_TIMEOUT", "DEFAULT_TOKENIZER", "Flags", "Settings", "config_path",
           "resolve"]
FILE_KEYS = ("controller", "timeout", "tokenizer", "instance_id", "auth_token", "coordinator")
SECRET_KEYS = frozenset({"auth_token"})
ENV_VARS = {"controller": CONTROLLER_ENV, "timeout": TIMEOUT_ENV, "tokenizer": TOKENIZER_ENV,
            "instance_id": INSTANCE_ID_ENV, "auth_token": AUTH_TOKEN_ENV,
            "coordinator": COORDINATOR_ENV}
# coordinator: an LMCache MP coordinator (kvctl's or upstream's); none = the controller API
DEFAULTS: dict[str, Any] = {"controller": DEFAULT_CONTROLLER, "timeout": DEFAULT_TIMEOUT,
                            "tokenizer": DEFAULT_TOKENIZER, "instance_id": DEFAULT_INSTANCE_ID,
                            "auth_token": None, "coordinator": None}


def config_path() -> Path:
    """The settings file in use (it need not exist)."""
    named = env(SETTINGS_FILE_ENV)
    if named:
        return Path(named).expanduser()
    import typer

    return Path(typer.get_app_dir("kvctl")) / "config.yaml"


def load_file(path: Path | None = None) -> dict[str, Any]:
    """The config file's keys; a missing file is empty, a malformed one is an error."""
    path = path or config_path()
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KvctlError(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise KvctlError(f"config file {path}: expected a mapping of keys "
                         f"({', '.join(FILE_KEYS)})")
    unknown = sorted(set(map(str, data)) - set(FILE_KEYS))
    if unknown:
        raise KvctlError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(FILE_KEYS)}")
    return data


def normalize_url(url: str) -> str:
    """Accept ``host:port`` as the seeds write controller addresses."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def check_url(url: str, source: str) -> str:
    """The controller URL, normalized; one that is not a single http(s) URL is a usage error
    naming where it came from."""
    import httpx

    norm = normalize_url(url)
    if "," in norm:
        raise UsageError(f"controller from {source}: {url!r} names several addresses; kvctl "
                         "talks to one controller (two controllers sharing a --state serve "
                         "the same events and workers: name either)")
    try:
        parsed = httpx.URL(norm)
        ok = parsed.scheme in ("http", "https") and bool(parsed.host) and " " not in norm
    except httpx.InvalidURL:
        ok = False
    if not ok:
        raise UsageError(f"controller from {source}: {url!r} is not an http(s) URL or "
                         "host:port")
    return norm


@dataclass(frozen=True)
class Settings:
    """The effective settings of one invocation; ``sources`` says where each came from
    (``--flag``, an environment variable, the config file's path, or ``default``)."""

    controller: str = DEFAULT_CONTROLLER
    timeout: float = DEFAULT_TIMEOUT
    tokenizer: str = DEFAULT_TOKENIZER
    instance_id: str = DEFAULT_INSTANCE_ID
    coordinator: str | None = None
    # the bearer token of a server run with --auth-token; repr=False: never in a traceback
    auth_token: str | None = field(default=None, repr=False)
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def as_rows(self) -> list[tuple[str, Any, str]]:
        """(key, value, source) per setting; a secret shows only whether it is set."""
        return [(k, ("(set)" if getattr(self, k) else None) if k in SECRET_KEYS
                 else getattr(self, k), self.sources.get(k, "default")) for k in FILE_KEYS]


@dataclass(frozen=True)
class Flags:
    """Global flags as given on the command line; None means not given."""

    controller: str | None = None
    timeout: float | None = None
    tokenizer: str | None = None
    instance_id: str | None = None
    coordinator: str | None = None
    auth_token: str | None = field(default=None, repr=False)  # no CLI flag: API use only


def resolve(flags: Flags | None = None) -> Settings:
    """Settings from flags, then env, then the config file (read once), then defaults."""
    flags = flags or Flags()
    path = config_path()
    file = load_file(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in FILE_KEYS:
        flag, from_env = getattr(flags, key), env(ENV_VARS[key])
        if flag is not None:
            values[key], sources[key] = flag, f"--{key.replace('_', '-')}"
        elif from_env:
            values[key], sources[key] = from_env, ENV_VARS[key]
        elif file.get(key) is not None:
            values[key], sources[key] = file[key], str(path)
        else:
            values[key], sources[key] = DEFAULTS[key], "default"
    try:
        timeout = float(values["timeout"])
    except (TypeError, ValueError):
        raise UsageError(f"timeout from {sources['timeout']} must be a number of seconds, "
                         f"got {values['timeout']!r}") from None
    if not timeout > 0:
        raise UsageError(f"timeout from {sources['timeout']} must be > 0, got {timeout:g}")
    token = values["auth_token"]
    return Settings(controller=check_url(str(values["controller"]), sources["controller"]),
                    timeout=timeout,
                    tokenizer=str(values["tokenizer"]), instance_id=str(values["instance_id"]),
                    auth_token=str(token) if token else None,
                    coordinator=normalize_url(str(values["coordinator"]))
                    if values["coordinator"] else None, sources=sources)
