"""Hostile requests against real uvicorn servers on loopback (issue 12, items 3-7 and 11).

Every app (controller, monitor, engine) runs under uvicorn on an ephemeral 127.0.0.1 port in
a thread of the test process; requests go over real sockets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch
import uvicorn

from kvctl.server.config import ServerSettings
from kvctl.server.engine.core import Engine, create_engine_app
from kvctl.server.http.app import create_app
from kvctl.server.http.limits import BodyLimit
from kvctl.server.redact import redact, register_secret
from kvctl.server.runner import create_monitor_app
from tests.conftest import free_port

INSTANCE = "lmcache_default_instance"
CAP = 1024 * 1024  # the body cap these servers run with
BAD_IDS = [2**63, 10**30, -(2**63) - 1, -1, 2**31]


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    # inherited by accepted sockets: no 40 ms delayed-ACK stall per request (as runner._bind)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """``app`` under a real uvicorn server on loopback; yields its base URL."""
    sock = _bound_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@dataclass
class Stack:
    controller: str
    monitor: str
    engine: str
    controller_app: object
    engine_app: object
    runtime: object


@pytest.fixture(scope="module")
def stack(lm, smollm2_tokenizer, tmp_path_factory) -> Iterator[Stack]:
    settings = ServerSettings(model="none", max_body_bytes=CAP, max_request_tokens=100_000,
                              local_disk=str(tmp_path_factory.mktemp("disk")),
                              max_local_disk_size=1, chunk_size=16)
    controller = create_app(settings)
    with serve(controller) as c_url:
        rt = controller.state.runtime
        monitor = create_monitor_app(controller)
        engine = create_engine_app(rt, engine=Engine(lm, smollm2_tokenizer, rt, [lm.name]))
        with serve(monitor) as m_url, serve(engine) as e_url:
            yield Stack(c_url, m_url, e_url, controller, engine, rt)


def _bodies(tokens: list[int]) -> dict[str, dict]:
    pos = [INSTANCE, "LocalCPUBackend"]
    return {
        "/compress": {"instance_id": INSTANCE, "method": "cachegen",
                      "location": "LocalCPUBackend", "tokens": tokens},
        "/decompress": {"instance_id": INSTANCE, "method": "cachegen",
                        "location": "LocalCPUBackend", "tokens": tokens},
        "/lookup": {"tokens": tokens},
        "/pin": {"instance_id": INSTANCE, "location": "LocalCPUBackend", "tokens": tokens},
        "/unpin": {"instance_id": INSTANCE, "location": "LocalCPUBackend", "tokens": tokens},
        "/move": {"old_position": pos, "new_position": [INSTANCE, "LocalDiskBackend"],
                  "tokens": tokens},
    }


# ------------------------------------------------------------------ token ids (3) ----
@pytest.mark.parametrize("bad", BAD_IDS, ids=["2^63", "10^30", "-2^63-1", "-1", "2^31"])
def test_out_of_range_token_ids_are_422_on_every_endpoint(stack, bad):
    tokens = [1, 2, bad, 3]
    for path, body in _bodies(tokens).items():
        r = httpx.post(stack.controller + path, json=body)
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert "token ids must be integers in [0, 2**31); tokens[2]" in r.json()["detail"]
    r = httpx.post(stack.engine + "/detokenize", json={"tokens": tokens})
    assert r.status_code == 422, r.text
    r = httpx.post(stack.engine + "/v1/completions", json={"prompt": tokens, "max_tokens": 1})
    assert r.status_code == 422, r.text
    assert "tokens[2]" in r.json()["detail"]


def test_many_malformed_ids_make_one_short_detail(stack):
    r = httpx.post(stack.controller + "/lookup", json={"tokens": ["x"] * 50_000})
    assert r.status_code == 422
    assert len(r.json()["detail"]) < 300, len(r.text)


def test_largest_valid_token_id_is_accepted(stack):
    r = httpx.post(stack.controller + "/lookup", json={"tokens": [0, 2**31 - 1]})
    assert r.status_code == 200, r.text


def test_token_count_is_bounded_by_the_schema():
    from pydantic import ValidationError

    from kvctl.server.http.schemas import MAX_REQUEST_TOKENS, LookupRequest

    assert LookupRequest(tokens=[0] * MAX_REQUEST_TOKENS).tokens[-1] == 0
    with pytest.raises(ValidationError, match="at most"):
        LookupRequest(tokens=[0] * (MAX_REQUEST_TOKENS + 1))


# ------------------------------------------------------------------ engine 500s (5) ----
def test_lone_surrogate_prompt_is_422(stack):
    # JSON's \ud800 escape decodes to a lone surrogate no tokenizer can encode
    raw = '{"prompt": "hello \\ud800 world", "max_tokens": 1}'
    for path in ("/v1/completions", "/tokenize"):
        r = httpx.post(stack.engine + path, content=raw,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert "surrogate" in r.json()["detail"]
    r = httpx.post(stack.engine + "/v1/completions", content=(
        '{"prompt": "hi", "max_tokens": 1, "stop": ["\\udfff"]}'),
        headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_outside_the_generator_range_is_422(stack, seed):
    r = httpx.post(stack.engine + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 1, "seed": seed})
    assert r.status_code == 422, r.text
    assert "seed" in r.json()["detail"]


def test_largest_seed_still_completes(stack):
    r = httpx.post(stack.engine + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 1, "seed": 2**64 - 1}, timeout=120)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------ body on the stream (4) ----
def _middleware(app, cls):
    node = app.middleware_stack
    while node is not None and not isinstance(node, cls):
        node = getattr(node, "app", None)
    assert node is not None, f"{cls.__name__} is not installed"
    return node


def _peak_rss_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _chunked_upload(url: str, path: str, total: int) -> tuple[int, bytes]:
    """Stream ``total`` bytes as a chunked body over a raw socket; returns (bytes the
    server let us send before it hung up, what it answered)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    answer = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"[" + b"1," * 32767 + b"1"  # 64 KiB of a JSON array that never closes
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    try:
        sock.sendall(head.encode())
        while sent < total:
            sock.sendall(frame)
            sent += len(chunk)
    except OSError:
        pass  # the server hung up: what we want
    reader.join(60)
    sock.close()
    return sent, bytes(answer)


@pytest.mark.parametrize("which,path", [("controller", "/lookup"), ("engine", "/tokenize")])
def test_chunked_body_is_cut_at_the_cap(stack, which, path):
    app = stack.controller_app if which == "controller" else stack.engine_app
    limit = _middleware(app, BodyLimit)
    rss0 = _peak_rss_reset()
    sent, answer = _chunked_upload(getattr(stack, which), path, 256 * 1024 * 1024)
    grown = (_status_kib("VmHWM") - rss0) * 1024
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"limit" in answer
    # the app was handed at most the cap; the server stopped reading and hung up long before
    # the upload's end, and the process never held it
    assert 0 < limit.max_passed <= CAP
    assert sent < 64 * 1024 * 1024, sent
    assert grown < 48 * 1024 * 1024, grown


@pytest.mark.parametrize("which", ["controller", "monitor", "engine"])
def test_content_length_over_the_cap_is_413_on_every_app(stack, which):
    r = httpx.post(getattr(stack, which) + "/events", content=b"x" * (CAP + 1))
    assert r.status_code == 413, r.text
    assert str(CAP) in r.json()["detail"]


# --------------------------------------------------------------- metric labels (11) ----
def test_method_spellings_share_one_metric_label(stack):
    rt = stack.runtime
    spellings = [" CacheGen ", "CACHEGEN", "cachegen\t"]
    events = []
    for i, method in enumerate(spellings):
        tokens = list(range(1000 * i, 1000 * i + 32))
        kv = torch.randn(2, 2, 32, 1, 8).half()
        rt.store_kv(tokens, kv)
        r = httpx.post(stack.controller + "/compress", json={
            "instance_id": INSTANCE, "method": method, "location": "LocalCPUBackend",
            "tokens": tokens})
        assert r.status_code == 200, r.text
        events.append(r.json()["event_id"])
    for eid in events:
        ev = rt.events.wait(eid, 120)
        assert ev["status"] == "finished", ev
        assert ev["method"] == "cachegen"
    metrics = httpx.get(stack.monitor + "/metrics").text
    labels = {line.split('method="')[1].split('"')[0]
              for line in metrics.splitlines() if line.startswith("kvctl_codec_chunks")}
    assert labels == {"cachegen"}, labels


def test_unknown_method_never_reaches_metrics(stack):
    r = httpx.post(stack.controller + "/compress", json={
        "instance_id": INSTANCE, "method": "zstd-9000", "location": "LocalCPUBackend",
        "tokens": [1, 2, 3]})
    assert r.status_code == 400
    assert "zstd" not in httpx.get(stack.monitor + "/metrics").text


# ------------------------------------------------------------------- echoed input (11) ----
def test_details_do_not_echo_long_inputs(stack):
    long = "x" * 100_000
    cases = [
        ("/compress", {"instance_id": long, "method": "cachegen", "location": "LocalCPUBackend",
                       "tokens": [1]}),
        ("/compress", {"instance_id": INSTANCE, "method": long, "location": "LocalCPUBackend",
                       "tokens": [1]}),
        ("/pin", {"instance_id": INSTANCE, "location": long, "tokens": [1]}),
        ("/check_finish", {"event_id": long}),
    ]
    for path, body in cases:
        r = httpx.post(stack.controller + path, json=body)
        assert 400 <= r.status_code < 500, (path, r.status_code)
        assert len(r.text) < 600, (path, len(r.text))
    for app in (stack.controller, stack.monitor, stack.engine):
        r = httpx.get(app + "/events/" + "y" * 8000)
        assert r.status_code == 414, r.text
        assert len(r.text) < 600, len(r.text)


# ------------------------------------------------------------------- Host header (11) ----
@pytest.mark.parametrize("which", ["controller", "monitor", "engine"])
def test_foreign_host_header_is_refused_on_loopback(stack, which):
    url = getattr(stack, which)
    port = url.rsplit(":", 1)[1]
    path = "/events" if which != "engine" else "/v1/models"
    r = httpx.get(url + path, headers={"Host": f"attacker.example:{port}"})
    assert r.status_code == 421, r.text
    assert "DNS rebinding" in r.json()["detail"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost",
                 f"[::1]:{port}", f"{socket.gethostname()}:{port}"):
        r = httpx.get(url + path, headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_are_accepted():
    app = create_app(ServerSettings(model="none", allowed_hosts=["kvctl.internal"]))
    with serve(app) as url:
        assert httpx.get(url + "/codecs", headers={"Host": "kvctl.internal:1"}).status_code == 200
        assert httpx.get(url + "/codecs", headers={"Host": "other.internal"}).status_code == 421


# ---------------------------------------------------------------------- secrets (6) ----
def test_redact_masks_url_credentials_params_and_registered_secrets():
    assert redact("at redis://:pw@host:6379/0: down") == "at redis://:***@host:6379/0: down"
    assert redact("rediss://default:p%40ss@a,b/0") == "rediss://default:***@a,b/0"
    assert redact("GET /x?token=abc&y=1") == "GET /x?token=***&y=1"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert redact("http://host:8000/x user@example.com") == "http://host:8000/x user@example.com"
    assert redact('auth_token: "abcdef" X-Api-Key: k1') == 'auth_token: "***" X-Api-Key: ***'
    text = '{"num_tokens": 5, "tokens": [1, 2], "token_count": 3}'
    assert redact(text) is text  # words that merely contain a keyword are left alone
    register_secret('tok"en-123456')
    assert redact('{"e": "tok\\"en-123456 and tok"en-123456"}') == '{"e": "*** and ***"}'


@pytest.fixture
def redis_with_password(tmp_path) -> Iterator[tuple[str, str, subprocess.Popen]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    import redis

    password = "s3cr3t-hunter2-pw"
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", password,
                             "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
    try:
        yield f"redis://:{password}@127.0.0.1:{port}/0", password, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_redis_password_never_leaves_the_server(redis_with_password, caplog):
    url, password, proc = redis_with_password
    caplog.set_level(logging.DEBUG)
    settings = ServerSettings(model="none", remote_url=url, chunk_size=16)
    app = create_app(settings)
    with serve(app) as c_url:
        monitor = create_monitor_app(app)
        with serve(monitor) as m_url:
            proc.terminate()  # Redis goes away: every remote operation now fails
            proc.wait(10)
            seen = []
            r = httpx.post(c_url + "/lookup", json={"tokens": list(range(64))}, timeout=60)
            seen.append(r.text)
            r = httpx.post(c_url + "/compress", timeout=60, json={
                "instance_id": INSTANCE, "method": "cachegen", "location": "RemoteBackend",
                "tokens": list(range(64))})
            seen.append(r.text)
            if r.status_code == 200:
                app.state.runtime.events.wait(r.json()["event_id"], 60)
            events = httpx.get(c_url + "/events")
            assert events.status_code == 200
            seen += [events.text, httpx.get(m_url + "/events").text,
                     httpx.get(m_url + "/metrics").text,
                     httpx.post(c_url + "/query_worker_info", json={"instance_id": INSTANCE},
                                timeout=60).text]
            # the failure was reported somewhere, with the URL's host but not its password
            joined = "\n".join(seen)
            assert "127.0.0.1" in joined
            assert password not in joined
            assert password not in caplog.text
            assert password not in json.dumps([r.getMessage() for r in caplog.records])


def test_error_tables_are_derived_from_the_classes():
    from kvctl.server import errors
    from kvctl.server.http.app import ERROR_STATUS, error_response

    assert set(errors.ERRORS_BY_KIND.values()) == set(ERROR_STATUS) == set(errors.ERRORS)
    for cls in errors.ERRORS:
        assert errors.error_from_kind(cls.kind, "x").__class__ is cls
        r = error_response(cls("what to fix"))
        assert r.status_code == cls.http_status and 400 <= r.status_code < 600
    assert error_response(errors.Busy("wait")).headers["retry-after"] == "1"
    # a kind the controller does not know comes back as the base class (a 500)
    assert type(errors.error_from_kind("from-the-future", "x")) is errors.DomainError
