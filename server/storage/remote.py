"""RemoteBackend: chunks in Redis (or Valkey), a single server or a Redis Cluster.

``remote_url`` forms::

    redis://[user:password@]host:port[/db]     rediss://...  (TLS)     unix:///path.sock
    redis://host1:port1,host2:port2,...        several startup nodes: a Redis Cluster
    redis+cluster://host:port                  a cluster reached through one startup node
    valkey://..., valkeys://...                the same, as LMCache spells Valkey URLs

Each chunk is one hash ``PREFIX:INSTANCE:c:KEY`` with fields ``b`` (blob), ``n`` (tokens),
``c`` (codec label) and ``p`` (pinned): one key per chunk, so a cluster spreads chunks over
its slots and no command spans two slots. Batch calls go out as pipelines of bounded size, so
N chunks cost a few round trips, not N. Socket timeouts are short and retries few: an outage
fails the work at hand within seconds, with a reason that never shows the password, and the
next call after Redis returns reconnects by itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from kvctl.server.storage.base import (
    UNKNOWN_CODEC,
    BackendStats,
    StorageBackend,
    StorageError,
    codec_label,
)

_SCHEMES = {"redis": False, "valkey": False, "rediss": True, "valkeys": True}
# one pipeline carries at most this many commands / blob bytes, so a batch of large chunks
# neither builds one huge buffer nor holds a socket past its timeout
_MAX_BATCH = 64
_MAX_BATCH_BYTES = 32 * 1024 * 1024
# how long a read of Redis's eviction policy is trusted
_POLICY_TTL_S = 10.0


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v or "")


@dataclass
class RedisTarget:
    """What a ``remote_url`` says, with the password kept out of every printable form."""

    tls: bool = False
    cluster: bool = False
    nodes: list[tuple[str, int]] = field(default_factory=list)
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    unix_path: str | None = None
    display: str = ""


def _host_port(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "6379"
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "6379")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(f"remote_url {url}: {text!r} is not host:port")
    return host, int(port)


def parse_remote_url(url: str) -> RedisTarget:
    """Parse ``remote_url``; every error message shows the URL with its password masked."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    shown = redact_url(url)
    if not sep:
        raise StorageError(f"remote_url {shown}: expected redis://host:port[/db]")
    if scheme == "lm":
        raise StorageError(f"remote_url {shown}: lm:// needs LMCache's own server; use "
                           "redis://host:port")
    if scheme == "unix":
        path = rest.partition("?")[0]
        return RedisTarget(unix_path="/" + path.lstrip("/"), display=shown)
    cluster = scheme.endswith("+cluster")
    base = scheme.removesuffix("+cluster")
    if base not in _SCHEMES:
        raise StorageError(f"remote_url {shown}: unsupported scheme {scheme!r}; use redis://, "
                           "rediss:// (TLS), redis+cluster:// or unix://")
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = [_host_port(h, shown) for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise StorageError(f"remote_url {shown}: no host given")
    db = 0
    if path.strip("/"):
        if not path.strip("/").isdigit():
            raise StorageError(f"remote_url {shown}: database {path!r} is not a number")
        db = int(path.strip("/"))
    cluster = cluster or len(nodes) > 1
    if cluster and db:
        raise StorageError(f"remote_url {shown}: a Redis Cluster has only database 0")
    return RedisTarget(tls=_SCHEMES[base], cluster=cluster, nodes=nodes, db=db,
                       username=username, password=password, display=shown)


def redact_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:***" if colon else user
    return f"{scheme}://{masked}@{hosts}{slash}{path}"


class RemoteBackend(StorageBackend):
    """Chunks in Redis / Redis Cluster."""

    name = "RemoteBackend"

    def __init__(self, url: str, namespace: str, *, key_prefix: str = "kvctl",
                 socket_timeout: float = 5.0, connect_timeout: float = 2.0) -> None:
        self.target = parse_remote_url(url)
        self.url = self.target.display
        self._secret = self.target.password
        self._ns = f"{key_prefix}:{namespace}:c:"
        self._redis: Any = self._connect(socket_timeout, connect_timeout)
        self._policy: tuple[float, str | None] | None = None

    def _connect(self, socket_timeout: float, connect_timeout: float) -> Any:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        t = self.target
        # Two quick retries: enough to replace a pooled connection that died while Redis
        # restarted, few enough that an outage is reported within seconds.
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), 2)
        common: dict[str, Any] = dict(
            username=t.username, password=t.password, socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout, retry=retry)
        if t.unix_path:
            return redis.Redis(unix_socket_path=t.unix_path, **common)
        if t.tls:
            common["ssl"] = True
        if t.cluster:
            from redis.cluster import ClusterNode, RedisCluster

            try:
                return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.nodes],
                                    require_full_coverage=True, **common)
            except redis.RedisError as exc:
                raise StorageError(self._reason(exc)) from None
        host, port = t.nodes[0]
        return redis.Redis(host=host, port=port, db=t.db, **common)

    # ---- plumbing -----------------------------------------------------------------------
    def _reason(self, exc: BaseException) -> str:
        msg = str(exc) or type(exc).__name__
        if self._secret:
            msg = msg.replace(self._secret, "***")
        return f"{self.name} at {self.url} unreachable or failing: {msg}"

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        import redis

        try:
            return fn(*args, **kw)
        except (redis.RedisError, OSError) as exc:
            raise StorageError(self._reason(exc)) from None

    def _k(self, key: str) -> str:
        return self._ns + key

    def _batches(self, items: Sequence[Any], size_of: Any = None) -> Iterator[Sequence[Any]]:
        start, nbytes = 0, 0
        for i, item in enumerate(items):
            nbytes += size_of(item) if size_of else 0
            if i + 1 - start >= _MAX_BATCH or nbytes >= _MAX_BATCH_BYTES:
                yield items[start:i + 1]
                start, nbytes = i + 1, 0
        if start < len(items):
            yield items[start:]

    def _pipelined(self, items: Sequence[Any], add: Any, size_of: Any = None) -> list[Any]:
        """Run ``add(pipe, item)`` for every item, in bounded pipelines; all replies."""
        out: list[Any] = []
        for batch in self._batches(items, size_of):
            pipe = self._redis.pipeline(transaction=False)
            for item in batch:
                add(pipe, item)
            out.extend(self._call(pipe.execute))
        return out

    def ping(self) -> None:
        self._call(self._redis.ping)

    # ---- single-chunk calls ---------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        self.put_many([(key, blob, num_tokens)])

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def codec_of(self, key: str) -> str | None:
        return self.codecs_many([key])[0]

    def num_tokens(self, key: str) -> int:
        v = self._call(self._redis.hget, self._k(key), "n")
        return int(v) if v is not None else 0

    def delete(self, key: str) -> int:
        ntok = self.num_tokens(key)
        removed = self._call(self._redis.delete, self._k(key))
        return ntok if removed else 0

    # ---- batches ------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._pipelined(list(keys), lambda p, k: p.hget(self._k(k), "b"))

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [bool(x) for x in
                self._pipelined(list(keys), lambda p, k: p.hexists(self._k(k), "b"))]

    def codecs_many(self, keys: Sequence[str]) -> list[str | None]:
        out = self._pipelined(list(keys), lambda p, k: p.hget(self._k(k), "c"))
        return [v.decode() if v is not None else None for v in out]

    def put_many(self, items: Iterable[tuple[str, bytes, int]],
                 protect: Sequence[str] = ()) -> int:
        rows = [(k, b, n, codec_label(b)) for k, b, n in items]
        self._pipelined(
            rows, lambda p, r: p.hset(self._k(r[0]), mapping={"b": r[1], "n": r[2], "c": r[3]}),
            size_of=lambda r: len(r[1]))
        return len(rows)

    def pin_refusal(self) -> str | None:
        """Redis evicts by its own policy, which kvctl cannot override per key: under an
        ``allkeys-*`` policy with a memory limit any key may go, pinned or not, so pins are
        refused there. Under ``noeviction`` or ``volatile-*`` a key without a TTL is never
        evicted, and a pin removes any TTL (PERSIST). A Redis that will not say its policy
        (CONFIG disabled) is taken at its word: pins accepted, as before."""
        now = time.monotonic()
        if self._policy is None or now - self._policy[0] > _POLICY_TTL_S:
            try:
                got = self._redis.config_get("maxmemory*")
            except Exception:  # CONFIG renamed or refused (managed Redis), or unreachable
                got = {}
            # a Redis Cluster answers per node: any node that may evict any key counts
            rows = list(got.values()) if got and all(isinstance(v, dict)
                                                     for v in got.values()) else [got]
            why = None
            for row in rows:
                policy = _text(row.get("maxmemory-policy") or row.get(b"maxmemory-policy"))
                limit = _text(row.get("maxmemory") or row.get(b"maxmemory"))
                if policy.startswith("allkeys") and limit not in ("", "0"):
                    why = (f"{self.name} at {self.url} cannot hold a pin: its maxmemory-policy "
                           f"is {policy} (maxmemory {limit} B), so Redis may evict any key, "
                           "pinned or not. Use noeviction or a volatile-* policy there, or pin "
                           "in LocalCPUBackend/LocalDiskBackend")
            self._policy = (now, why)
        return self._policy[1]

    def set_pinned_many(self, keys: Sequence[str], pinned: bool) -> int:
        keys = list(keys)
        present = [k for k, ok in zip(keys, self.contains_many(keys), strict=True) if ok]
        if pinned:
            # PERSIST: a pinned key carries no TTL, which no volatile-* policy evicts
            self._pipelined(present, lambda p, k: (p.hset(self._k(k), "p", 1),
                                                   p.persist(self._k(k))))
        else:
            self._pipelined(present, lambda p, k: p.hdel(self._k(k), "p"))
        return len(present)

    def keys(self) -> list[str]:
        n = len(self._ns)
        found = self._call(lambda: list(self._redis.scan_iter(match=self._ns + "*", count=1000)))
        return sorted({k.decode()[n:] for k in found})

    def clear(self) -> int:
        keys = self.keys()
        tokens = self._pipelined(keys, lambda p, k: p.hget(self._k(k), "n"))
        self._pipelined(keys, lambda p, k: p.delete(self._k(k)))
        return sum(int(t) for t in tokens if t is not None)

    def stats(self) -> BackendStats:
        keys = self.keys()
        rows = self._pipelined(keys, lambda p, k: p.hstrlen(self._k(k), "b"))
        meta = self._pipelined(keys, lambda p, k: p.hmget(self._k(k), ["c", "p"]))
        by_codec: dict[str, int] = {}
        pinned = 0
        for size, (c, p) in zip(rows, meta, strict=True):
            label = c.decode() if c is not None else UNKNOWN_CODEC
            by_codec[label] = by_codec.get(label, 0) + int(size)
            pinned += p is not None
        return BackendStats(len(keys), sum(by_codec.values()), None, pinned, by_codec)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._redis.close()
