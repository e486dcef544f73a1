"""One redaction function for everything that leaves the process: responses, logs, errors.

``redact(text)`` masks credentials in URLs (``redis://:pw@host`` -> ``redis://:***@host``),
``password=``/``token=`` style parameters, ``Bearer`` tokens, and every secret registered
with ``register_secret`` (the auth token, the Redis password), wherever they appear. The
server applies it at its boundaries (``RedactResponses`` on every app, ``install_logging``
for every log record), so a secret that reaches an exception message, an event's error or
a detail is masked even when the code that produced the message did not think of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from urllib.parse import unquote, urlsplit

MASK = "***"
# A secret shorter than this is only masked where it appears in credential position
# (URL userinfo, password=...): masking a two-letter password everywhere would garble text.
MIN_REGISTERED = 6
OFFLOAD_BYTES = 256 * 1024

# The scan is anchored on literals found with bytes.find (C speed), and only there does a
# small regex decide what to mask: a 4 MB /events body costs milliseconds, not the half
# second that whole-text regexes cost. Bytes, because bytes.lower() keeps every offset.
# scheme://user:password@host -> scheme://user:***@host (the user is kept: not secret)
_URL_TAIL = re.compile(rb"[^\s/:@'\"]*:([^\s@/'\"]*)@")
_PARAM_TAIL = re.compile(rb"[\"']?\s*[=:]\s*[\"']?([^\s&,;'\"]+)")
_BEARER_TAIL = re.compile(rb"\s+([A-Za-z0-9._~+/=-]+)")
_KEYWORDS = (b"password", b"passwd", b"pwd", b"token", b"secret", b"api_key", b"api-key",
             b"apikey")

_lock = threading.Lock()
_secrets: list[bytes] = []  # longest first, so a secret containing another goes whole


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` (and its JSON-escaped spelling) wherever it appears from now on."""
    global _secrets
    if not secret or len(secret) < MIN_REGISTERED:
        return
    spellings = {secret.encode("utf-8", "surrogatepass"),
                 json.dumps(secret)[1:-1].encode("utf-8", "surrogatepass")}
    with _lock:
        if spellings <= set(_secrets):
            return
        _secrets = sorted(set(_secrets) | spellings, key=len, reverse=True)


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


def _find_all(hay: bytes, needle: bytes) -> list[int]:
    out, i = [], hay.find(needle)
    while i >= 0:
        out.append(i)
        i = hay.find(needle, i + 1)
    return out


def _spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of ``data`` that hold a credential."""
    spans = []
    for i in _find_all(data, b"://"):
        m = _URL_TAIL.match(data, i + 3)
        if m:
            spans.append(m.span(1))
    lower = data.lower()  # ASCII only: offsets stay put
    for kw in _KEYWORDS:
        for i in _find_all(lower, kw):
            # any prefix (auth_token=, X-Api-Key:); what follows decides: num_tokens, with
            # no = or : after the keyword, is no credential
            m = _PARAM_TAIL.match(data, i + len(kw))
            if m:
                spans.append(m.span(1))
    for i in _find_all(lower, b"bearer"):
        m = _BEARER_TAIL.match(data, i + 6)
        if m:
            spans.append(m.span(1))
    return spans


def redact_bytes(data: bytes) -> bytes:
    """``data`` with credentials and registered secrets replaced by ``***``; the same
    object when there was nothing to mask."""
    if not data:
        return data
    spans = _spans(data)
    out = data
    if spans:
        parts, pos = [], 0
        for a, b in sorted(spans):
            if a >= pos and b > a:
                parts += [data[pos:a], MASK.encode()]
                pos = b
        out = b"".join([*parts, data[pos:]])
    for secret in _secrets:
        if secret in out:
            out = out.replace(secret, MASK.encode())
    return data if out == data else out


def redact(text: str) -> str:
    """``text`` with credentials and registered secrets replaced by ``***``."""
    if not text:
        return text
    data = text.encode("utf-8", "surrogatepass")
    out = redact_bytes(data)
    return text if out is data else out.decode("utf-8", "surrogatepass")


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
def is_text(content_type: bytes | None) -> bool:
    """Whether a body of this ``Content-Type`` is text that redaction may rewrite: JSON,
    ``text/*`` (metrics, errors), or no type at all. Anything else (chunk bytes,
    ``application/octet-stream``) is bytes and passes untouched: KV that happens to spell
    ``pwd=`` is not a password, and rewriting it corrupts the chunk."""
    if not content_type:
        return True
    t = content_type.split(b";", 1)[0].strip().lower()
    return t.startswith(b"text/") or t == b"application/json" or t.endswith(b"+json")


class RedactResponses:
    """ASGI middleware: text response bodies pass through ``redact`` before they leave.

    Text bodies are buffered (every kvctl text response is a bounded JSON or metrics
    document) so a secret split across two writes is still found; ``content-length`` is
    recomputed. Binary bodies (`is_text`) stream through unchanged.
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
                ctype = next((v for k, v in message.get("headers", [])
                              if k.lower() == b"content-type"), None)
                if not is_text(ctype):
                    await send(message)  # type: ignore[operator]
                    return
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)  # type: ignore[operator]
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            raw = b"".join(chunks)
            # a long /events listing takes tens of milliseconds: off the event loop
            body = (await asyncio.to_thread(redact_bytes, raw) if len(raw) > OFFLOAD_BYTES
                    else redact_bytes(raw))
            headers = start.get("headers", [])
            if body is not raw:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

        await self.app(scope, receive, buffered_send)  # type: ignore[operator]
