"""One redaction function for everything that leaves the process: responses, logs, errors.

``redact(text)`` masks credentials in URLs (``redis://:pw@host`` -> ``redis://:***@host``),
``password=``/``token=`` style parameters, ``Bearer`` tokens, and every secret registered
with ``register_secret`` (the auth token, the Redis password), wherever they appear. The
server applies it at its boundaries (``RedactResponses`` on every app, ``install_logging``
for every log record), so a secret that reaches an exception message, an event's error or
a detail is masked even when the code that produced the message did not think of it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from urllib.parse import unquote, urlsplit

MASK = "***"
# A secret shorter than this is only masked where it appears in credential position
# (URL userinfo, password=...): masking a two-letter password everywhere would garble text.
MIN_REGISTERED = 6

# scheme://user:password@host -> scheme://user:***@host (user kept: it helps and is not secret)
_URL_CREDS = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@'\"]*):[^\s@/'\"]*@")
_PARAM = re.compile(r"(?P<pre>\b(?:password|passwd|pwd|token|auth_token|secret|api_key|apikey)"
                    r"[\"']?\s*[=:]\s*[\"']?)[^\s&,;'\"]+", re.IGNORECASE)
_BEARER = re.compile(r"(?P<pre>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` (and its URL- and JSON-escaped spellings) from now on."""
    global _secret_re
    if not secret or len(secret) < MIN_REGISTERED:
        return
    spellings = {secret, json.dumps(secret)[1:-1]}
    with _lock:
        if spellings <= _secrets:
            return
        _secrets.update(spellings)
        # longest first, so a secret that contains another is masked whole
        alts = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in alts))


def register_url(url: str | None) -> None:
    """Register the password of a URL such as ``redis://:pw@host`` as a secret."""
    if not url:
        return
    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))


def redact(text: str) -> str:
    """``text`` with credentials and registered secrets replaced by ``***``."""
    if not text:
        return text
    out = _URL_CREDS.sub(lambda m: f"{m['pre']}:{MASK}@", text)
    out = _PARAM.sub(lambda m: f"{m['pre']}{MASK}", out)
    out = _BEARER.sub(lambda m: f"{m['pre']}{MASK}", out)
    pattern = _secret_re
    if pattern is not None:
        out = pattern.sub(MASK, out)
    return out


def redact_bytes(body: bytes) -> bytes:
    """``redact`` for a UTF-8 (JSON or text) body; other bytes pass unchanged."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    out = redact(text)
    return body if out == text else out.encode("utf-8")


# ------------------------------------------------------------------------- logging ----
_installed = False


def install_logging() -> None:
    """Redact every log record of the process when it is created (message, arguments and
    traceback text), whichever logger or handler later writes it. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        # Message and arguments are redacted one by one and left in place, so formatters
        # that read record.args (uvicorn's access log does) keep working.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)


def _redact_arg(arg: object) -> object:
    if arg is None or isinstance(arg, int | float | bool):
        return arg  # numbers keep %d and %.1f working
    text = str(arg)
    out = redact(text)
    return arg if out == text else out


# ------------------------------------------------------------------------ responses ----
class RedactResponses:
    """ASGI middleware: response bodies pass through ``redact`` before they leave.

    Bodies are buffered (every kvctl response is a bounded JSON or metrics document) so a
    secret split across two writes is still found; ``content-length`` is recomputed.
    """

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[operator]
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def buffered_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)  # type: ignore[operator]
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            raw = b"".join(chunks)
            body = redact_bytes(raw)
            headers = start.get("headers", [])
            if body is not raw:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

        await self.app(scope, receive, buffered_send)  # type: ignore[operator]
