"""Server settings: LMCache-style YAML config files, env overrides and `kvctl serve` flags.

Both seed config files load unchanged. Every LMCache key either works or is named in one
warning saying it has no effect here (it configures a part of an LMCache deployment that the
bundled server replaces); keys nobody knows warn too. None is dropped silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvctl.common.defaults import (
    AUTH_TOKEN_ENV,
    CONFIG_FILE_ENV,
    DEFAULT_INSTANCE_ID,
    DEFAULT_MODEL,
    env,
)
from kvctl.server.redact import redact

log = logging.getLogger("kvctl.server")


# LMCache keys that are meaningful upstream but configure nothing in the bundled server:
# accepted (a real LMCache config loads) and named in a warning.
_ACCEPTED_UPSTREAM_KEYS = frozenset({
    "save_decode_cache", "enable_blending", "blend_recompute_ratio",
    "blend_min_tokens", "enable_p2p", "lookup_url", "lmcache_worker_ids", "pipelined_backend",
    "use_layerwise", "cache_policy", "extra_config", "blocking_timeout_secs",
    "nixl_role", "enable_nixl", "enable_pd", "pd_role", "external_lookup_client",
    "internal_api_server_enabled", "internal_api_server_port_start", "gds_path",
    "weka_path", "cufile_buffer_size", "local_disk_path", "priority_limit", "py_enable_gc",
    "cache_engine_use_cudagraph", "numa_mode", "error_handling", "enable_async_loading",
})


# LMCache's serde names for the remote tier; any kvctl method string works as well
_SERDE_ALIASES = {"naive": "raw"}


class ConfigError(ValueError):
    """A config file or setting is invalid; the message names the key."""


class ServerSettings(BaseModel):
    """Everything `kvctl serve` needs. Field names follow LMCache's config keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # LMCache keys
    chunk_size: int = Field(256, ge=1, le=1 << 20)
    local_cpu: bool = True
    max_local_cpu_size: float = Field(5.0, gt=0, description="GB")
    local_disk: str | None = None
    max_local_disk_size: float = Field(0.0, ge=0, description="GB; 0 = 10 GB default")
    remote_url: str | None = None
    remote_serde: str = Field("naive", description="codec of chunks in the remote tier: "
                              "naive (fp16), cachegen, or any kvctl method")
    save_unfull_chunk: bool = Field(True, description="store a prompt's last partial chunk")
    enable_controller: bool = True
    lmcache_instance_id: str = DEFAULT_INSTANCE_ID
    controller_url: str | None = None
    controller_pull_url: str | None = None
    lmcache_worker_port: int | None = None
    lmcache_worker_ports: int | list[int] | None = None
    distributed_url: str | None = None
    p2p_host: str | None = None
    p2p_init_ports: int | list[int] | None = None

    # kvctl serve
    host: str = "127.0.0.1"
    port: int = Field(9000, ge=0, le=65535)
    monitor_port: int | None = Field(9001, ge=0, le=65535)
    engine_port: int = Field(8000, ge=0, le=65535)
    model: str = DEFAULT_MODEL
    codec_threads: int = Field(1, ge=1, le=64, description="size of the codec worker pool")
    torch_threads: int = Field(0, ge=0, le=256, description="0 = torch default")
    max_request_tokens: int = Field(1_000_000, ge=1)
    max_events: int = Field(10_000, ge=10, description="finished events kept in memory at "
                            "most; the oldest go first")
    max_queued_jobs: int = Field(256, ge=1, description="jobs waiting for a worker thread; "
                                 "beyond it /compress, /decompress, /move ... answer 429")
    remote_key_prefix: str = Field("kvctl", min_length=1, max_length=200,
                                   description="prefix of every Redis key kvctl writes")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024,
                                description="largest request body, chunked or not (413 beyond)")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host names accepted on loopback besides localhost "
                                          "(DNS rebinding protection)")
    auth_token: str | None = Field(None, repr=False, description="bearer token every port "
                                   "requires (also $KVCTL_AUTH_TOKEN)")
    insecure: bool = Field(False, description="allow a non-loopback host without auth_token")

    @field_validator("auth_token")
    @classmethod
    def _usable_token(cls, v: str | None) -> str | None:
        from kvctl.server.http.auth import check_token

        return check_token(v) if v else None

    # cluster: the controller's state, worker liveness, where codec work runs
    state: str | None = Field(None, description="redis://host:port[/db] for the controller's "
                              "events and worker registry; none = in memory")
    embedded_worker: bool = Field(True, description="kvctl serve runs a worker in-process")
    codec_pool: Literal["process", "thread"] = "process"
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60)
    dead_after_s: float = Field(10.0, gt=0, le=3600,
                                description="a worker silent this long is dead")
    event_retention_s: float = Field(86_400.0, gt=0,
                                     description="ended events kept this long in Redis state")
    worker_timeout_s: float = Field(5.0, gt=0, le=600,
                                    description="how long the controller waits for a worker")
    advertise_host: str | None = Field(None, description="host other processes reach this "
                                       "one at; default: host")
    # the cluster boundary: what a worker (or anything registered as one) may cost
    max_workers: int = Field(256, ge=1, le=100_000, description="registered workers at most "
                             "(dead ones make room); a registration beyond answers 409")
    fanout_timeout_s: float = Field(1.0, gt=0, le=600, description="how long /lookup, "
                                    "/workers and /metrics wait for each worker; a later "
                                    "answer is left out and its instance marked late")
    max_chunk_elements: int = Field(1 << 26, ge=1, le=1 << 32, description="elements a chunk "
                                    "blob may claim in its header before it is decoded")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a request's headers "
                                    "must arrive within this (slowloris)")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body may "
                                  "pause this long between reads; then 408")

    # LMCache 0.5.6 fleets: the controller sockets their LMCacheWorkers talk to
    lmcache_monitor_ports: dict[str, int] | None = Field(
        None, description="bind LMCache's controller sockets: {pull, reply, heartbeat} ports "
                          "(pull 8300 / reply 8400 if left out, heartbeat OS-chosen)")
    lmcache_monitor_host: str = Field("127.0.0.1", description="address the LMCache sockets "
                                      "bind; they cannot authenticate")
    lmcache_job_timeout_s: float = Field(600.0, gt=0, le=86_400, description="longest an "
                                         "LMCache compress, decompress or move may run")
    lmcache_max_workers: int = Field(4096, ge=1, description="LMCache workers registered at "
                                     "most; registrations beyond are refused and counted")
    lmcache_none_hash: int = Field(0, description="seed of LMCache's chunk-hash chain: 0 "
                                   "without vLLM; with vLLM, the NONE_HASH LMCache logs")
    lmcache_max_keys: int = Field(1_000_000, ge=1, description="chunk hashes kept per LMCache "
                                  "worker and location; admits beyond are dropped and counted")

    @field_validator("lmcache_monitor_ports", mode="before")
    @classmethod
    def _monitor_ports(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            import json

            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError('expected JSON like {"pull": 8300, "reply": 8400, '
                                 '"heartbeat": 8500}') from None
        if not isinstance(v, dict):
            raise ValueError('expected a mapping like {"pull": 8300, "reply": 8400}')
        unknown = sorted(set(v) - {"pull", "reply", "heartbeat"})
        if unknown:
            raise ValueError(f"unknown socket(s) {', '.join(map(repr, unknown))}; the LMCache "
                             "sockets are pull, reply and heartbeat")
        out = {"pull": 8300, "reply": 8400}
        for k, port in v.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"{k}: a port is an integer in [0, 65535], got {port!r}")
            out[k] = port
        return out

    # LMCache MP coordinator (`lmcache server --coordinator-url http://HOST:PORT`)
    coordinator_port: int | None = Field(None, ge=0, le=65535, description="serve LMCache's "
                                         "MP coordinator API here (LMCache's default: 9300)")
    coordinator_allow: list[str] = Field(
        default_factory=list, description="addresses/networks (besides loopback) whose MP "
                                          "servers may register and post events")
    coordinator_instance_timeout_s: float = Field(30.0, gt=0, le=3600, description="an MP "
                                                  "server silent this long is deregistered")
    coordinator_max_keys: int = Field(1_000_000, ge=1, description="most keys the directory "
                                      "holds; store entries for new keys beyond are dropped "
                                      "and counted")
    coordinator_keep_token_ids: bool = Field(True, description="keep each chunk's token ids "
                                             "(returned by lookups; ~1 KiB per key)")
    coordinator_chunk_size: int = Field(256, ge=1, le=1 << 20, description="the MP servers' "
                                        "chunk size, for hashing token ids")

    @field_validator("coordinator_allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. "
                                 "10.0.0.7 or 10.0.0.0/24)") from None
        return [e.strip() for e in v]

    @field_validator("lmcache_instance_id")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("remote_serde")
    @classmethod
    def _known_serde(cls, v: str) -> str:
        from kvctl.codecs import CodecError, available_methods, codec_for_method

        method = _SERDE_ALIASES.get(v.strip().lower(), v.strip().lower())
        try:
            codec_for_method(method)
        except CodecError:
            raise ValueError(f"unknown serde {v!r}; use naive, or one of kvctl's methods: "
                             f"{', '.join(available_methods())}") from None
        return v

    @property
    def remote_method(self) -> str:
        """The kvctl method string ``remote_serde`` names (``naive`` is ``raw``)."""
        v = self.remote_serde.strip().lower()
        return _SERDE_ALIASES.get(v, v)

    @property
    def local_disk_path(self) -> Path | None:
        """`local_disk` as a path (LMCache writes it as `file:///path/`)."""
        if not self.local_disk:
            return None
        raw = self.local_disk
        if raw.startswith("file://"):
            raw = raw[len("file://"):]
        return Path(raw).expanduser()

    @field_validator("state")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port[/db]")
        return v or None

    @property
    def worker_port(self) -> int | None:
        """The port `kvctl worker` serves the controller's commands on."""
        ports = self.lmcache_worker_ports
        if isinstance(ports, list):
            return ports[0] if ports else self.lmcache_worker_port
        return ports if ports is not None else self.lmcache_worker_port

    @property
    def controller_urls(self) -> list[str]:
        """Where a worker registers: `controller_url` and/or `controller_pull_url`.

        Either may hold several comma-separated addresses (controllers sharing one state);
        a bare host:port means http.
        """
        out: list[str] = []
        for raw in (self.controller_url, self.controller_pull_url):
            for part in (raw or "").split(","):
                part = part.strip().rstrip("/")
                if part:
                    url = part if "://" in part else f"http://{part}"
                    if url not in out:
                        out.append(url)
        return out

    @property
    def public_host(self) -> str:
        host = self.advertise_host or self.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1024**3)

    @property
    def disk_bytes(self) -> int:
        return int((self.max_local_disk_size or 10.0) * 1024**3)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        # never echo a secret: the token not at all, URLs without their credentials
        got = "hidden" if key == "auth_token" else redact(repr(err.get("input")))
        parts.append(f"{key}: {err['msg']} (got {got})")
    return f"{source}: " + "; ".join(parts)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an LMCache YAML config; unknown keys warn and are dropped."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values, got {type(data).__name__}")
    known = set(ServerSettings.model_fields)
    out: dict[str, Any] = {}
    no_effect = []
    for key, value in data.items():
        if key in known:
            out[key] = value
        elif key == "cache_policy" and str(value).strip().upper() == "LRU":
            continue  # what every kvctl tier does
        elif key in _ACCEPTED_UPSTREAM_KEYS:
            no_effect.append(key)
        else:
            log.warning("config %s: unknown key %r ignored", p, key)
    if no_effect:
        log.warning("config %s: LMCache key(s) %s have no effect in kvctl's bundled server; "
                    "ignored", p, ", ".join(sorted(no_effect)))
    return out


def build_settings(config_file: str | os.PathLike[str] | None = None,
                   overrides: dict[str, Any] | None = None) -> ServerSettings:
    """Settings from the config file (arg, else $LMCACHE_CONFIG_FILE), then explicit overrides.

    Overrides whose value is None are ignored, so CLI flags left unset fall through.
    """
    source = str(config_file or env(CONFIG_FILE_ENV) or "")
    data = load_config_file(source) if source else {}
    token = env(AUTH_TOKEN_ENV)
    if token:  # the environment beats the file, a flag beats both
        data["auth_token"] = token
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServerSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source or "settings")) from None
