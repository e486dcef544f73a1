"""How the controller reaches a worker: one interface, one transport per kind of worker.

`InProcessTransport` calls the worker object of `kvctl serve` directly; `HttpTransport` talks
to a `kvctl worker` process. Both dispatch through `kvctl.server.worker.ops.WORKER_OPS`, both
raise the worker's domain errors as the same classes, and an unreachable or slow worker is a
`WorkerUnavailable` after at most the configured timeout, never a hang.
`kvctl.server.lmcache.transport.ZmqWorkerTransport` is the third: an LMCache 0.5.6 worker
over its REP socket. It keeps no events (``runs_jobs`` False), so the controller runs and
tracks the job (`kvctl.server.lmcache.fleet`) and ``call`` returns when the worker is done.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from typing import Any

from kvctl.codecs import CodecError
from kvctl.server.errors import (
    BadRequest,
    DomainError,
    StoreUnavailable,
    WorkerUnavailable,
    error_from_kind,
)
from kvctl.server.http.pool import HttpError, HttpPool, Reply
from kvctl.server.storage import StorageError
from kvctl.server.worker.jobs import checksum
from kvctl.server.worker.ops import INLINE_OPS, LOCAL_QUICK_OPS, WORKER_OPS
from kvctl.server.worker.runtime import WorkerRuntime

# Chunk bytes travel as the body; what they are travels in these headers.
NUM_TOKENS_HEADER = "x-kvctl-num-tokens"
CHECKSUM_HEADER = "x-kvctl-checksum"


class WorkerTransport(ABC):
    """A channel to one worker."""

    url: str
    # a kvctl worker schedules jobs and keeps their events; ``call`` answers at once
    runs_jobs = True

    @abstractmethod
    async def call(self, op: str, body: dict[str, Any]) -> Any:
        """Run a command of `WORKER_OPS` on the worker and return its JSON-able result."""

    @abstractmethod
    async def get_chunk(self, location: str, key: str) -> tuple[bytes, int, str]:
        """A stored chunk: its blob, the tokens it covers, the sender's checksum."""

    @abstractmethod
    async def put_chunk(self, location: str, key: str, blob: bytes, num_tokens: int,
                        digest: str) -> str:
        """Store a chunk; the worker checks ``digest`` and returns the digest it computed."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _worker_error(exc: Exception) -> DomainError:
    """Storage and codec failures inside a worker, as domain errors."""
    if isinstance(exc, StorageError):
        return StoreUnavailable(str(exc))
    if isinstance(exc, CodecError):
        return BadRequest(str(exc))
    raise exc


class InProcessTransport(WorkerTransport):
    """The worker embedded in `kvctl serve`, called directly."""

    def __init__(self, runtime: WorkerRuntime, url: str) -> None:
        self.runtime = runtime
        self.url = url

    async def call(self, op: str, body: dict[str, Any]) -> Any:
        fn = WORKER_OPS[op]
        try:
            if op in INLINE_OPS or (op in LOCAL_QUICK_OPS and self.runtime.all_local):
                return fn(self.runtime, body)
            # Checking which chunks a location holds may be network I/O (Redis): off the loop.
            return await asyncio.to_thread(fn, self.runtime, body)
        except (StorageError, CodecError) as exc:
            raise _worker_error(exc) from None

    async def get_chunk(self, location: str, key: str) -> tuple[bytes, int, str]:
        try:
            blob, ntok = await asyncio.to_thread(self.runtime.export_chunk, location, key)
        except StorageError as exc:
            raise _worker_error(exc) from None
        return blob, ntok, await asyncio.to_thread(checksum, blob)

    async def put_chunk(self, location: str, key: str, blob: bytes, num_tokens: int,
                        digest: str) -> str:
        try:
            return await asyncio.to_thread(self.runtime.import_chunk, location, key, blob,
                                           num_tokens, digest)
        except StorageError as exc:
            raise _worker_error(exc) from None


class HttpTransport(WorkerTransport):
    """A `kvctl worker` process, over its HTTP command API (`kvctl.server.worker.app`)."""

    def __init__(self, url: str, instance_id: str, timeout_s: float,
                 auth_token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.instance_id = instance_id
        # one token for the cluster: the controller presents its own to the worker
        self._auth = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        # connect fails fast (a dead worker's port refuses at once); replies get the budget.
        self._http = HttpPool(self.url, timeout_s, connect_timeout_s=min(1.0, timeout_s))

    async def _send(self, method: str, path: str, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> Reply:
        try:
            r = await self._http.request(method, path, body, {**self._auth, **(headers or {})})
        except HttpError as exc:
            raise WorkerUnavailable(f"the worker of instance {self.instance_id!r} at "
                                    f"{self.url} did not answer {path} ({exc})") from None
        if r.status >= 400:
            try:
                data = json.loads(r.body)
            except ValueError:
                data = {"detail": r.body[:300].decode("utf-8", "replace")}
            detail = data.get("detail") if isinstance(data, dict) else None
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind is None and r.status >= 500:
                raise WorkerUnavailable(f"the worker of instance {self.instance_id!r} at "
                                        f"{self.url} failed on {path} (HTTP {r.status}): "
                                        f"{detail}")
            raise error_from_kind(kind, str(detail or f"HTTP {r.status} from {path}"))
        return r

    def _json(self, r: Reply, path: str) -> Any:
        try:
            return json.loads(r.body)
        except ValueError:
            raise WorkerUnavailable(f"the worker of instance {self.instance_id!r} at "
                                    f"{self.url} answered {path} with something that is not "
                                    "JSON") from None

    async def call(self, op: str, body: dict[str, Any]) -> Any:
        path = f"/worker/ops/{op}"
        r = await self._send("POST", path, json.dumps(body).encode(), _JSON)
        return self._json(r, path)

    async def get_chunk(self, location: str, key: str) -> tuple[bytes, int, str]:
        r = await self._send("GET", f"/worker/chunks/{location}/{key}")
        try:
            return r.body, int(r.headers[NUM_TOKENS_HEADER]), r.headers[CHECKSUM_HEADER]
        except (KeyError, ValueError):
            raise WorkerUnavailable(f"the worker at {self.url} sent chunk {key} without its "
                                    "token count or checksum") from None

    async def put_chunk(self, location: str, key: str, blob: bytes, num_tokens: int,
                        digest: str) -> str:
        path = f"/worker/chunks/{location}/{key}"
        r = await self._send("PUT", path, blob,
                             {NUM_TOKENS_HEADER: str(num_tokens), CHECKSUM_HEADER: digest,
                              "Content-Type": "application/octet-stream"})
        return str(self._json(r, path)["checksum"])

    async def close(self) -> None:
        await self._http.close()


_JSON = {"Content-Type": "application/json"}
