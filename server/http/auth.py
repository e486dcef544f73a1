"""Optional bearer-token authentication, the same on every port (controller, monitor,
worker, engine).

With ``auth_token`` set (``kvctl serve --auth-token``, ``KVCTL_AUTH_TOKEN`` or the config
key), every HTTP request must carry ``Authorization: Bearer <token>``; anything else is a
401 before the request is routed or its body read. OpenAI clients send their ``api_key``
this way, so the engine works with them unchanged. Tokens are compared in constant time
and registered with ``redact``, so they never appear in a log line or a response.
"""

from __future__ import annotations

import hmac
import ipaddress

from kvctl.common.defaults import AUTH_TOKEN_ENV, env
from kvctl.server import redact
from kvctl.server.http.limits import ASGIApp, Receive, Scope, Send, _answer, _header

ENV = AUTH_TOKEN_ENV
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = frozenset({"localhost", "localhost.localdomain"})


def check_token(token: str) -> str:
    """A usable token: long enough to resist guessing, and safe in an HTTP header."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"auth token must be at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if not all(33 <= ord(c) < 127 for c in token):
        raise ValueError("auth token must be printable ASCII without spaces")
    return token


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without a token unless explicitly ``insecure``."""
    if token or insecure or is_loopback(host):
        return
    raise PermissionError(
        f"refusing to listen on {host} without authentication: anyone who can reach it could "
        "read and delete cached KV. Set --auth-token (or KVCTL_AUTH_TOKEN), or pass "
        "--insecure to serve unauthenticated anyway")


def client_headers(token: str | None = None) -> dict[str, str]:
    """The header a kvctl client sends: ``token`` or ``$KVCTL_AUTH_TOKEN``, if either."""
    token = token or env(ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def unauthorized_detail(header_given: bool) -> str:
    """The 401's detail. Worded so that ``redact`` leaves it whole: no word follows
    "bearer" or "token:" where a credential would stand."""
    why = ("the Authorization header does not carry this server's token" if header_given
           else "the request has no Authorization header")
    return (f"authentication required: {why}; send 'Authorization: Bearer <token>' (kvctl "
            f"reads it from {ENV} or the auth_token of its settings file)")


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <token>`` matches."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()
        redact.register_secret(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or ""
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken does not depend on how much of the token matched
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              self._token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            await _answer(send, 401, unauthorized_detail(bool(given)),
                          headers=[(b"www-authenticate", b'Bearer realm="kvctl"')])
