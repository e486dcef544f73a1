"""HTTP client of an LMCache MP coordinator: kvctl's (`kvctl serve --coordinator-port`) or
upstream's (`lmcache coordinator`). The sibling of `kvctl.client` for MP fleets: commands
never build URLs here either, and every HTTP failure becomes a user message in this module.

Which coordinator answers is probed once (``GET /openapi.json``: its title); what only
kvctl's has (ingest state) is asked of kvctl's alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from kvctl.client import PROBE_MAX_BYTES, PROBE_PATH, _detail
from kvctl.common.defaults import AUTH_TOKEN_ENV, env
from kvctl.errors import EXIT_FAILURE, EXIT_REJECTED, KvctlError

KVCTL_TITLE = "kvctl coordinator"
UPSTREAM_TITLE = "LMCache MP Coordinator"


class CoordinatorError(KvctlError):
    """The coordinator answered an error status (4xx: refused as given, exit 2)."""

    def __init__(self, status: int, path: str, detail: str) -> None:
        if status >= 500:
            msg = f"the coordinator failed on {path} (HTTP {status}): {detail}"
        elif status == 401:
            msg = (f"{detail} (HTTP 401 from {path}); kvctl sends the token in "
                   "KVCTL_AUTH_TOKEN, or the settings file's auth_token (kvctl config path)")
        else:
            msg = f"{detail} (HTTP {status} from {path})"
        super().__init__(msg, EXIT_REJECTED if 400 <= status < 500 else EXIT_FAILURE)
        self.status = status
        self.detail = detail


def _error_detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):  # upstream's 404s
        return body["error"]
    return _detail(r)


class CoordinatorClient:
    """Synchronous client of one MP coordinator."""

    def __init__(self, base_url: str, timeout: float = 30.0, auth_token: str | None = None
                 ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        token = auth_token or env(AUTH_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        self._kind: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None) -> Any:
        try:
            r = self.http.request(method, path, json=body, params=params)
        except httpx.ConnectError:
            raise KvctlError(f"cannot reach the coordinator at {self.base_url} — start one "
                             "with `kvctl serve --coordinator-port PORT`, or pass "
                             "--coordinator / set KVCTL_COORDINATOR") from None
        except httpx.TimeoutException:
            raise KvctlError(f"the coordinator at {self.base_url} did not answer {path} "
                             f"within {self.timeout:g} s (raise --timeout)") from None
        except httpx.HTTPError as exc:
            raise KvctlError(f"request to {self.base_url}{path} failed: {exc}") from None
        if r.status_code >= 400:
            if r.status_code in (404, 405) and _error_detail(r) == "Not Found":
                self.kind()  # names what answers instead, if it is no coordinator
            raise CoordinatorError(r.status_code, path, _error_detail(r))
        if r.status_code == 204 or not r.content:
            return {}
        try:
            return r.json()
        except ValueError:
            raise KvctlError(f"the coordinator at {self.base_url} answered {path} with "
                             f"something that is not JSON: {r.text[:200]!r}") from None

    def kind(self) -> str:
        """``kvctl`` or ``lmcache``; KvctlError when the URL is no MP coordinator."""
        if self._kind is None:
            title = self._title()
            if title == KVCTL_TITLE:
                self._kind = "kvctl"
            elif title == UPSTREAM_TITLE:
                self._kind = "lmcache"
            else:
                what = f"a server titled {title!r}" if title else "a server"
                raise KvctlError(f"{self.base_url} is {what} but not an LMCache MP "
                                 "coordinator; point --coordinator (or KVCTL_COORDINATOR) at "
                                 "`kvctl serve --coordinator-port`'s port or at `lmcache "
                                 "coordinator`")
        return self._kind

    def _title(self) -> str:
        try:
            with self.http.stream("GET", PROBE_PATH, timeout=min(self.timeout, 5.0)) as r:
                if r.status_code == 401:  # kvctl's, asking for the token
                    r.read()
                    raise CoordinatorError(401, PROBE_PATH, _error_detail(r))
                if r.status_code != 200:
                    return ""
                data = b""
                for part in r.iter_bytes():
                    data += part
                    if len(data) > PROBE_MAX_BYTES:
                        return ""
            spec = json.loads(data)
        except httpx.ConnectError:
            raise KvctlError(f"cannot reach the coordinator at {self.base_url} — start one "
                             "with `kvctl serve --coordinator-port PORT`, or pass "
                             "--coordinator / set KVCTL_COORDINATOR") from None
        except (httpx.HTTPError, ValueError):
            return ""
        info = spec.get("info") if isinstance(spec, dict) else None
        return str(info.get("title", "")) if isinstance(info, dict) else ""

    # ---- fleet --------------------------------------------------------------------------
    def instances(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/instances").get("instances", []))

    def usage(self) -> dict[str, Any]:
        return self.request("GET", "/instances/usage")

    def ingest(self) -> dict[str, Any] | None:
        """kvctl's ingest state per instance; None from upstream's (it keeps it hidden)."""
        if self.kind() != "kvctl":
            return None
        return self.request("GET", "/instances/ingest")

    # ---- cache --------------------------------------------------------------------------
    @staticmethod
    def _q(tokens: Sequence[int], model_name: str, world_size: int, cache_salt: str
           ) -> dict[str, Any]:
        return {"model_name": model_name, "world_size": world_size,
                "token_ids": list(tokens), "cache_salt": cache_salt}

    def lookup(self, tokens: Sequence[int], model_name: str, world_size: int = 1,
               cache_salt: str = "") -> dict[str, Any]:
        return self.request("POST", "/directory/lookup",
                            self._q(tokens, model_name, world_size, cache_salt))

    def pin(self, tokens: Sequence[int], model_name: str, world_size: int = 1,
            cache_salt: str = "") -> dict[str, Any]:
        return self.request("POST", "/cache/pins",
                            self._q(tokens, model_name, world_size, cache_salt))

    def unpin(self, tokens: Sequence[int], model_name: str, world_size: int = 1,
              cache_salt: str = "") -> dict[str, Any]:
        return self.request("DELETE", "/cache/pins",
                            self._q(tokens, model_name, world_size, cache_salt))

    def delete(self, instance_id: str, tokens: Sequence[int], model_name: str, tier: str,
               force: bool = False, world_size: int = 1, cache_salt: str = ""
               ) -> dict[str, Any]:
        return self.request("POST", "/cache/delete", {
            **self._q(tokens, model_name, world_size, cache_salt),
            "instance_id": instance_id, "tier": tier, "force": force})

    def prefetch(self, instance_id: str, tokens: Sequence[int], model_name: str,
                 world_size: int = 1, cache_salt: str = "") -> dict[str, Any]:
        return self.request("POST", "/cache/prefetches", {
            **self._q(tokens, model_name, world_size, cache_salt),
            "instance_id": instance_id})

    def prefetch_status(self, instance_id: str, request_id: str) -> dict[str, Any]:
        return self.request("GET", f"/cache/prefetches/{instance_id}/{request_id}")
