"""HTTP client of the controller API: one method per endpoint, errors turned into KvctlError.

Commands never build URLs or look at status codes; everything HTTP-shaped is decided here.
Tests inject an in-process app by setting an http factory (`set_http_factory`) that returns
e.g. Starlette's ``TestClient(app)``, an ``httpx.Client`` subclass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from kvctl.errors import KvctlError
from kvctl.settings import Settings

ENDED = ("finished", "failed")

HttpFactory = Callable[[str, float], httpx.Client]
_http_factory: HttpFactory | None = None


def set_http_factory(factory: HttpFactory | None) -> None:
    """Route every new ControllerClient through ``factory(base_url, timeout)``; None resets.

    A client made by the factory is not closed by ControllerClient: its owner closes it.
    """
    global _http_factory
    _http_factory = factory


def start_hint(url: str) -> str:
    return (f"cannot reach the controller at {url} — start one with `kvctl serve` (or "
            "`make serve`), or pass --controller / set KVCTL_CONTROLLER")


class ControllerError(KvctlError):
    """The controller answered with an error status; ``detail`` is its own explanation."""

    def __init__(self, status: int, path: str, detail: str) -> None:
        if status >= 500:
            msg = f"the controller failed on {path} (HTTP {status}): {detail}"
        else:
            msg = f"{detail} (HTTP {status} from {path})"
        super().__init__(msg)
        self.status = status
        self.path = path
        self.detail = detail


class UntrackedEvents(KvctlError):
    """The controller cannot report event status: upstream LMCache's synchronous one."""

    def __init__(self, url: str, event_id: str) -> None:
        super().__init__(
            f"the controller at {url} does not track events (/check_finish is not "
            "implemented there, as in upstream LMCache's controller). Such a controller "
            "finishes each operation before it answers, so event "
            f"{event_id} already ended when its event_id was returned.")
        self.event_id = event_id


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

    def __init__(self, base_url: str, timeout: float = 30.0,
                 http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._owned = http is None
        self.http = http if http is not None else httpx.Client(base_url=self.base_url,
                                                               timeout=timeout)
        # for a server run with --auth-token (never printed: errors show the detail only)
        token = os.environ.get("KVCTL_AUTH_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ControllerClient:
        http = _http_factory(settings.controller, settings.timeout) if _http_factory else None
        return cls(settings.controller, settings.timeout, http)

    def close(self) -> None:
        if self._owned:
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
            r = self.http.request(method, path, json=body, params=params, headers=self.headers)
        except httpx.ConnectError:
            raise KvctlError(start_hint(self.base_url)) from None
        except httpx.TimeoutException:
            raise KvctlError(f"the controller at {self.base_url} did not answer {path} within "
                             f"{self.timeout:g} s (raise --timeout or KVCTL_TIMEOUT)") from None
        except httpx.HTTPError as exc:
            raise KvctlError(f"request to {self.base_url}{path} failed: {exc}") from None
        if r.status_code >= 400:
            raise ControllerError(r.status_code, path, _detail(r))
        try:
            return r.json()
        except ValueError:
            raise KvctlError(f"the controller at {self.base_url} answered {path} with "
                             f"something that is not JSON: {r.text[:200]!r}") from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    # ---- cache operations (seed API) ----------------------------------------------------
    def compress(self, instance_id: str, method: str, location: str, tokens: Sequence[int]
                 ) -> dict[str, Any]:
        return self._post("/compress", {"instance_id": instance_id, "method": method,
                                        "location": location, "tokens": list(tokens)})

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
                raise UntrackedEvents(self.base_url, event_id) from None
            raise

    def event(self, event_id: str) -> dict[str, Any]:
        """The whole event; from /check_finish (status only) on a controller without /events.

        Raises UntrackedEvents when the controller cannot say anything about events.
        """
        try:
            return self.request("GET", f"/events/{event_id}")
        except ControllerError as exc:
            if not _route_missing(exc):
                raise
        return self.check_finish(event_id)

    def events(self, status: str | None = None, limit: int | None = None
               ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("status", status), ("limit", limit)) if v is not None}
        try:
            reply = self.request("GET", "/events", params=params or None)
        except ControllerError as exc:
            if _route_missing(exc):
                raise KvctlError(f"the controller at {self.base_url} has no event list "
                                 "(upstream LMCache's controller does not track events; "
                                 "`kvctl serve` does)") from None
            raise
        return list(reply.get("events", []))
