"""HTTP client of the controller API: one method per endpoint, errors turned into KvctlError.

Commands never build URLs or look at status codes; everything HTTP-shaped is decided here,
including what to say when the other end is not a controller: on a reply no controller
would give, the client probes the server once (``GET /openapi.json``) and names what it
found (an inference engine, kvctl's monitor port, upstream LMCache's controller, ...).

`connect(settings)` is the one way a client is made, in production and in tests (which
point it at real servers on loopback ports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from kvctl.common.events import ENDED
from kvctl.errors import EXIT_FAILURE, EXIT_REJECTED, KvctlError
from kvctl.settings import Settings

__all__ = ["ENDED", "ControllerClient", "ControllerError", "NoWorkerList", "UntrackedEvents"]
PROBE_PATH = "/openapi.json"
PROBE_MAX_BYTES = 4 * 1024 * 1024  # an OpenAPI document is tens of KiB; never read more


def start_hint(url: str) -> str:
    return (f"cannot reach the controller at {url} — start one with `kvctl serve` (or "
            "`make serve`), or pass --controller / set KVCTL_CONTROLLER")


class ControllerError(KvctlError):
    """The controller answered with an error status; ``detail`` is its own explanation."""

    def __init__(self, status: int, path: str, detail: str) -> None:
        if status >= 500:
            msg = f"the controller failed on {path} (HTTP {status}): {detail}"
        elif status == 401:
            msg = (f"{detail} (HTTP 401 from {path}); kvctl sends the token in "
                   "KVCTL_AUTH_TOKEN, or the settings file's auth_token (kvctl config path)")
        elif status == 429:
            # busy, not wrong: the same command works again in a moment
            msg = f"{detail} (HTTP 429 from {path}; nothing was queued)"
        else:
            msg = f"{detail} (HTTP {status} from {path})"
        # 4xx: the controller refused the request as given (an unknown instance, method,
        # location or event): nothing was done, the documented "rejected" code
        super().__init__(msg, EXIT_REJECTED if 400 <= status < 500 else EXIT_FAILURE)
        self.status = status
        self.path = path
        self.detail = detail


class NotAController(KvctlError):
    """Something answers at the controller URL, but it is not a controller."""

    def __init__(self, url: str, peer: Peer, path: str) -> None:
        super().__init__(
            f"{url} is {peer.description}, not a kvctl controller (it has no {path}); point "
            "--controller (or KVCTL_CONTROLLER) at the controller, which `kvctl serve` "
            "starts on port 9000 by default")
        self.peer = peer


class UntrackedEvents(KvctlError):
    """The controller cannot report event status: upstream LMCache's synchronous one."""

    def __init__(self, url: str, event_id: str) -> None:
        super().__init__(
            f"cannot follow event {event_id}: the controller at {url} does not track events "
            "(it is upstream LMCache's, which has no working /check_finish). That "
            "controller finishes each operation before it answers, so the event ended "
            "before its id was returned; `kvctl lookup` shows where the KV is now.")
        self.event_id = event_id


@dataclass(frozen=True)
class Peer:
    """What answers at a URL: ``kind`` is controller, monitor, engine, lmcache or unknown."""

    kind: str
    description: str


KVCTL_TITLES = {"kvctl controller": "controller", "kvctl monitor": "monitor",
                "kvctl engine": "engine"}


def classify(spec: Any) -> Peer:
    """Name the server behind an OpenAPI document (or None when it has none)."""
    if not isinstance(spec, dict):
        return Peer("unknown", "a server that is not a kvctl controller (no OpenAPI "
                               "description at /openapi.json)")
    title = str((spec.get("info") or {}).get("title", ""))
    paths = set(spec.get("paths") or {})
    kind = KVCTL_TITLES.get(title)
    if kind == "controller":
        return Peer("controller", "a kvctl controller")
    if kind == "monitor" or ({"/metrics", "/events"} <= paths and "/compress" not in paths):
        return Peer("monitor", "kvctl's monitor port (metrics and events, read-only)")
    if kind == "engine" or "/v1/completions" in paths or "/tokenize" in paths:
        return Peer("engine", "an inference engine (OpenAI-compatible API)")
    if paths & {"/compress", "/lookup", "/check_finish"} and "/events" not in paths:
        return Peer("lmcache", "upstream LMCache's controller")
    return Peer("unknown", f"a server titled {title!r}" if title else
                "a server that is not a kvctl controller")


class NoWorkerList(KvctlError):
    """The controller has no /workers (upstream LMCache's): only per-instance queries."""


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        text = r.text.strip()
        return text[:500] if text else r.reason_phrase or "no detail"
    if isinstance(body, dict) and "detail" in body:
        d = body["detail"]
        return d if isinstance(d, str) else json.dumps(d)
    return json.dumps(body)[:500]


def _route_missing(exc: ControllerError) -> bool:
    # FastAPI's answer for a path it has no route for, as opposed to our "unknown event_id"
    return exc.status == 405 or (exc.status == 404 and exc.detail == "Not Found")


class ControllerClient:
    """Synchronous client of one controller (our server or any seed-API controller)."""

    def __init__(self, base_url: str, timeout: float = 30.0, auth_token: str | None = None
                 ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # for a server run with --auth-token: every request carries it (never printed:
        # errors show the server's detail only)
        token = auth_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        self._peer: Peer | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON body or raise a KvctlError."""
        try:
            try:
                r = self.http.request(method, path, json=body, params=params)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A kept-alive connection that the server closed (uvicorn does after a 500)
                # can fail on reuse; a GET is safe to send once more, on a fresh connection.
                if method != "GET":
                    raise
                r = self.http.request(method, path, json=body, params=params)
        except httpx.ConnectError:
            raise KvctlError(start_hint(self.base_url)) from None
        except httpx.TimeoutException:
            raise KvctlError(f"the controller at {self.base_url} did not answer {path} within "
                             f"{self.timeout:g} s (raise --timeout or KVCTL_TIMEOUT)") from None
        except httpx.HTTPError as exc:
            raise KvctlError(f"request to {self.base_url}{path} failed: {exc}") from None
        if r.status_code >= 400:
            exc = ControllerError(r.status_code, path, _detail(r))
            if _route_missing(exc):
                self._unless_controller(path)
            raise exc
        try:
            return r.json()
        except ValueError:
            self._unless_controller(path)
            raise KvctlError(f"the controller at {self.base_url} answered {path} with "
                             f"something that is not JSON: {r.text[:200]!r}") from None

    def peer(self) -> Peer:
        """What answers at the base URL, probed once per client."""
        if self._peer is None:
            self._peer = classify(self._probe())
        return self._peer

    def _probe(self) -> Any:
        try:
            with self.http.stream("GET", PROBE_PATH, timeout=min(self.timeout, 5.0)) as r:
                if r.status_code != 200:
                    return None
                data = b""
                for part in r.iter_bytes():
                    data += part
                    if len(data) > PROBE_MAX_BYTES:
                        return None
            return json.loads(data)
        except (httpx.HTTPError, ValueError):
            return None

    def _unless_controller(self, path: str) -> None:
        """Raise NotAController when the server lacks ``path`` because it is no controller
        at all; return when it is a controller (kvctl's or upstream LMCache's)."""
        peer = self.peer()
        if peer.kind not in ("controller", "lmcache"):
            raise NotAController(self.base_url, peer, path) from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    # ---- cache operations (seed API) ----------------------------------------------------
    def compress(self, instance_id: str, method: str, location: str, tokens: Sequence[int],
                 force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"instance_id": instance_id, "method": method,
                                "location": location, "tokens": list(tokens)}
        if force:  # only sent when set: LMCache's controller knows no such field
            body["force"] = True
        return self._post("/compress", body)

    def decompress(self, instance_id: str, method: str, location: str, tokens: Sequence[int]
                   ) -> dict[str, Any]:
        return self._post("/decompress", {"instance_id": instance_id, "method": method,
                                          "location": location, "tokens": list(tokens)})

    def lookup(self, tokens: Sequence[int]) -> dict[str, Any]:
        return self._post("/lookup", {"tokens": list(tokens)})

    def clear(self, instance_id: str, location: str) -> dict[str, Any]:
        return self._post("/clear", {"instance_id": instance_id, "location": location})

    def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> dict[str, Any]:
        return self._post("/pin", {"instance_id": instance_id, "location": location,
                                   "tokens": list(tokens)})

    def unpin(self, instance_id: str, location: str, tokens: Sequence[int]) -> dict[str, Any]:
        return self._post("/unpin", {"instance_id": instance_id, "location": location,
                                     "tokens": list(tokens)})

    def move(self, old_position: tuple[str, str], new_position: tuple[str, str],
             tokens: Sequence[int], should_copy: bool = False) -> dict[str, Any]:
        return self._post("/move", {"old_position": list(old_position),
                                    "new_position": list(new_position),
                                    "tokens": list(tokens), "should_copy": should_copy})

    # ---- cluster ------------------------------------------------------------------------
    def health(self, instance_id: str) -> dict[str, Any]:
        return self._post("/health", {"instance_id": instance_id})

    def query_worker_info(self, instance_id: str, worker_ids: Sequence[int] | None = None
                          ) -> dict[str, Any]:
        body: dict[str, Any] = {"instance_id": instance_id}
        if worker_ids:
            body["worker_ids"] = list(worker_ids)
        return self._post("/query_worker_info", body)

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker (kvctl's controller; upstream LMCache's has no /workers)."""
        try:
            reply = self.request("GET", "/workers")
        except ControllerError as exc:
            if _route_missing(exc):
                raise NoWorkerList(f"the controller at {self.base_url} does not list its "
                                   "workers (upstream LMCache's has no /workers; `kvctl serve` "
                                   "does); use `kvctl health --instance-id ID`") from None
            raise
        found = reply.get("workers") if isinstance(reply, dict) else None
        if not isinstance(found, list) or not all(isinstance(w, dict) for w in found):
            raise KvctlError(f"the controller at {self.base_url} answered /workers with "
                             f"something that is not a worker list: {str(reply)[:200]!r}")
        return found

    def codecs(self) -> dict[str, Any]:
        try:
            return self.request("GET", "/codecs")
        except ControllerError as exc:
            if _route_missing(exc):
                raise KvctlError(f"the controller at {self.base_url} does not list its codecs "
                                 "(upstream LMCache's has no /codecs; `kvctl serve` does)"
                                 ) from None
            raise

    # ---- events -------------------------------------------------------------------------
    def check_finish(self, event_id: str) -> dict[str, Any]:
        try:
            return self._post("/check_finish", {"event_id": event_id})
        except ControllerError as exc:
            if exc.status >= 500 or _route_missing(exc):
                self._unless_controller("/check_finish")
                raise UntrackedEvents(self.base_url, event_id) from None
            raise

    def event(self, event_id: str) -> dict[str, Any]:
        """The whole event (an unambiguous prefix of its id will do on kvctl's controller);
        from /check_finish (status only) on a controller without /events.

        Raises UntrackedEvents when the controller cannot say anything about events.
        """
        if not event_id.strip():
            from kvctl.errors import UsageError

            raise UsageError("the event id is empty: give an id or a prefix of one "
                             "(`kvctl events list` shows them)")
        try:
            return self.request("GET", f"/events/{event_id}")
        except ControllerError as exc:
            if not _route_missing(exc):
                raise
        return self.check_finish(event_id)

    def events(self, status: str | None = None, limit: int | None = None,
               instance: str | None = None, method: str | None = None
               ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("status", status), ("limit", limit),
                                    ("instance", instance), ("method", method))
                  if v is not None}
        try:
            reply = self.request("GET", "/events", params=params or None)
        except ControllerError as exc:
            if _route_missing(exc):
                raise KvctlError(f"the controller at {self.base_url} has no event list "
                                 "(upstream LMCache's controller does not track events; "
                                 "`kvctl serve` does)") from None
            raise
        return list(reply.get("events", []))


def connect(settings: Settings) -> ControllerClient:
    """The client of the controller the settings name (the one constructor commands use)."""
    return ControllerClient(settings.controller, settings.timeout, settings.auth_token)
