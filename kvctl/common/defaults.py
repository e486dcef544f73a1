"""One home for kvctl's defaults and the environment variables it reads, CLI and server alike.

Everything else imports these names: a default is written once, and every environment
variable kvctl reads is listed here (and read through `env` / `debug`).
"""

from __future__ import annotations

import os

# ---- defaults -----------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2"  # the embedded model `kvctl serve` runs
DEFAULT_TOKENIZER = DEFAULT_MODEL  # the CLI tokenizes as that engine does
DEFAULT_INSTANCE_ID = "lmcache_default_instance"  # LMCache's own default
DEFAULT_CONTROLLER = "http://localhost:9000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_METHOD = "cachegen"
DEFAULT_LOCATION = "LocalCPUBackend"

# ---- environment variables ----------------------------------------------------------------
CONTROLLER_ENV = "KVCTL_CONTROLLER"
COORDINATOR_ENV = "KVCTL_COORDINATOR"  # an LMCache MP coordinator instead of the controller
TIMEOUT_ENV = "KVCTL_TIMEOUT"
TOKENIZER_ENV = "KVCTL_TOKENIZER"
INSTANCE_ID_ENV = "KVCTL_INSTANCE_ID"
AUTH_TOKEN_ENV = "KVCTL_AUTH_TOKEN"  # the CLI sends it; serve and worker require it
SETTINGS_FILE_ENV = "KVCTL_CONFIG"  # the CLI's settings file
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"  # serve's and worker's LMCache config, as LMCache
CACHE_DIR_ENV = "KVCTL_CACHE_DIR"
DEVICE_ENV = "KVCTL_DEVICE"  # where the worker decodes: auto, cpu, cuda
DEBUG_ENV = "KVCTL_DEBUG"  # 1: tracebacks instead of one-line errors
XDG_CACHE_HOME_ENV = "XDG_CACHE_HOME"


def env(name: str, default: str | None = None) -> str | None:
    """The value of environment variable ``name``; ``default`` when unset or empty."""
    return os.environ.get(name) or default


def debug() -> bool:
    """KVCTL_DEBUG=1: show tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV) == "1"
