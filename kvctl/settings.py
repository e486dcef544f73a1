"""CLI settings: flag > environment (KVCTL_*) > config file > built-in default.

The config file is ``<user config dir>/kvctl/config.yaml`` (``typer.get_app_dir``), or the
file named by ``KVCTL_CONFIG``; keys: controller, timeout, tokenizer, instance_id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvctl.errors import KvctlError

DEFAULT_CONTROLLER = "http://localhost:9000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_INSTANCE_ID = "lmcache_default_instance"
DEFAULT_METHOD = "cachegen"
DEFAULT_LOCATION = "LocalCPUBackend"
FILE_KEYS = ("controller", "timeout", "tokenizer", "instance_id")


def config_path() -> Path:
    """The settings file in use (it need not exist)."""
    env = os.environ.get("KVCTL_CONFIG")
    if env:
        return Path(env).expanduser()
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
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise KvctlError(f"config file {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(FILE_KEYS)}")
    return data


def normalize_url(url: str) -> str:
    """Accept ``host:port`` as the seeds write controller addresses."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


@dataclass(frozen=True)
class Settings:
    controller: str
    timeout: float
    tokenizer: str | None
    instance_id: str


def _pick(flag: Any, env: str, file: dict[str, Any], key: str, default: Any) -> tuple[Any, str]:
    if flag is not None:
        return flag, f"--{key.replace('_', '-')}"
    if os.environ.get(env):
        return os.environ[env], env
    if file.get(key) is not None:
        return file[key], str(config_path())
    return default, "default"


def resolve(controller: str | None = None, timeout: float | None = None,
            tokenizer: str | None = None, instance_id: str | None = None) -> Settings:
    """Settings from flags (None = not given), then env, then the config file."""
    file = load_file()
    url, _ = _pick(controller, "KVCTL_CONTROLLER", file, "controller", DEFAULT_CONTROLLER)
    raw_timeout, source = _pick(timeout, "KVCTL_TIMEOUT", file, "timeout", DEFAULT_TIMEOUT)
    try:
        t = float(raw_timeout)
    except (TypeError, ValueError):
        raise KvctlError(f"timeout from {source} must be a number of seconds, "
                         f"got {raw_timeout!r}", 2) from None
    if t <= 0:
        raise KvctlError(f"timeout from {source} must be > 0, got {t}", 2)
    tok, _ = _pick(tokenizer, "KVCTL_TOKENIZER", file, "tokenizer", None)
    inst, _ = _pick(instance_id, "KVCTL_INSTANCE_ID", file, "instance_id", DEFAULT_INSTANCE_ID)
    return Settings(controller=normalize_url(str(url)), timeout=t,
                    tokenizer=str(tok) if tok is not None else None, instance_id=str(inst))
