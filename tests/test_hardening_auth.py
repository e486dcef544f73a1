"""Optional bearer-token auth on every port, a CLI that sends it, and no secret in any output.

A real `kvctl serve` process (controller and monitor, Redis tier with a password) and the
engine under uvicorn in-process; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from kvctl.server.config import ConfigError, ServerSettings, build_settings
from kvctl.server.engine.core import Engine, create_engine_app
from kvctl.server.http.auth import check_exposure
from tests.cluster_procs import Proc, start_serve
from tests.conftest import free_port
from tests.test_hardening_server import redis_with_password, serve  # noqa: F401 (fixture)

TOKEN = "kvctl-test-token-5f2b9c81d04e"
INSTANCE = "lmcache_default_instance"


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCTL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Served:
    proc: Proc
    controller: str
    monitor: str
    redis_password: str
    redis_proc: subprocess.Popen


@pytest.fixture
def served(redis_with_password, tmp_path) -> Iterator[Served]:  # noqa: F811
    url, password, redis_proc = redis_with_password
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"remote_url: {url}\nchunk_size: 16\n")
    p = start_serve(tmp_path, "--config", str(cfg), "--access-log", engine=False,
                    env=clean_env(KVCTL_AUTH_TOKEN=TOKEN), headers=bearer(), timeout=90)
    try:
        yield Served(p, p.urls["api"], p.urls["monitor"], password, redis_proc)
    finally:
        p.stop()


def kvctl(controller: str, *args: str, token: str | None = None
          ) -> subprocess.CompletedProcess:
    env = clean_env(**({"KVCTL_AUTH_TOKEN": token} if token else {}))
    return subprocess.run([sys.executable, "-m", "kvctl", *args, "--controller", controller],
                          capture_output=True, text=True, timeout=120, env=env)


def test_every_port_requires_the_token_and_nothing_leaks(served: Served):
    for url, path in ((served.controller, "/events"), (served.controller, "/codecs"),
                      (served.monitor, "/metrics"), (served.monitor, "/healthz")):
        for headers in ({}, bearer("kvctl-test-token-wrong-guess"), {"Authorization": TOKEN}):
            r = httpx.get(url + path, headers=headers)
            assert r.status_code == 401, (url, path, headers, r.text)
            assert "KVCTL_AUTH_TOKEN" in r.json()["detail"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(url + path, headers=bearer()).status_code == 200
    # refused before the body is read: a huge upload gets its 401 at once
    r = httpx.post(served.controller + "/lookup", content=b"[" * (8 * 1024 * 1024))
    assert r.status_code == 401

    # the CLI: refused without the token (one line, non-zero), works with it
    r = kvctl(served.controller, "events", "list")
    assert r.returncode != 0 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr
    r = kvctl(served.controller, "events", "list", token=TOKEN)
    assert r.returncode == 0, r.stderr
    r = kvctl(served.controller, "lookup", "--tokens", "1,2,3", token=TOKEN)
    assert "nothing matched" in r.stderr, r.stderr  # the controller's answer, authenticated

    # Redis goes away; its failures reach details, events and logs, its password must not
    served.redis_proc.terminate()
    served.redis_proc.wait(10)
    outputs = []
    for path, body in (("/lookup", {"tokens": list(range(64))}),
                       ("/compress", {"instance_id": INSTANCE, "method": "cachegen",
                                      "location": "RemoteBackend", "tokens": list(range(64))})):
        outputs.append(httpx.post(served.controller + path, json=body, headers=bearer(),
                                  timeout=60).text)
    r = kvctl(served.controller, "lookup", "--tokens", "1,2,3", token=TOKEN)
    outputs += [r.stdout, r.stderr]
    outputs.append(httpx.get(served.controller + "/events", headers=bearer()).text)
    outputs.append(httpx.get(served.monitor + "/metrics", headers=bearer()).text)
    served.proc.stop()
    logs = served.proc.log.read_text()
    outputs.append(logs)
    everything = "\n".join(outputs)
    assert "127.0.0.1" in everything and "401" in logs  # failures and refusals were logged
    assert TOKEN not in everything
    assert served.redis_password not in everything


def test_engine_port_requires_the_token(lm, smollm2_tokenizer):
    from kvctl.server.worker.runtime import WorkerRuntime

    rt = WorkerRuntime(ServerSettings(model="none", auth_token=TOKEN))
    try:
        app = create_engine_app(rt, engine=Engine(lm, smollm2_tokenizer, rt, [lm.name]))
        with serve(app) as url:
            assert httpx.get(url + "/v1/models").status_code == 401
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            assert r.status_code == 401
            # what an OpenAI client sends with api_key=TOKEN
            assert httpx.get(url + "/v1/models", headers=bearer()).status_code == 200
    finally:
        rt.close()


def test_no_token_no_auth():
    # without a token configured nothing changes (the other suites run that way)
    assert ServerSettings().auth_token is None


def test_beyond_loopback_needs_a_token_or_insecure():
    check_exposure("127.0.0.1", None, False)
    check_exposure("::1", None, False)
    check_exposure("localhost", None, False)
    check_exposure("0.0.0.0", TOKEN, False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(PermissionError, match="--auth-token"):
        check_exposure("0.0.0.0", None, False)
    with pytest.raises(PermissionError):
        check_exposure("192.168.1.10", None, False)


def test_serve_refuses_an_exposed_host_without_a_token():
    r = subprocess.run([sys.executable, "-m", "kvctl", "serve", "--model", "none", "--host",
                        "0.0.0.0", "--port", str(free_port()), "--monitor-port",
                        str(free_port())], capture_output=True, text=True, timeout=120,
                       env=clean_env())
    assert r.returncode != 0
    assert "--auth-token" in r.stderr and "--insecure" in r.stderr
    assert "Traceback" not in r.stderr


def test_weak_token_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv("KVCTL_AUTH_TOKEN", "short-pw")
    with pytest.raises(ConfigError) as info:
        build_settings(None, {})
    assert "at least 16" in str(info.value)
    assert "short-pw" not in str(info.value)
    monkeypatch.setenv("KVCTL_AUTH_TOKEN", TOKEN)
    assert build_settings(None, {}).auth_token == TOKEN
    assert build_settings(None, {"auth_token": TOKEN + "-flag"}).auth_token == TOKEN + "-flag"
    assert TOKEN not in repr(build_settings(None, {}))


def test_401_reads_whole_and_the_cli_takes_the_token_from_its_settings_file(cli_env):
    """The 401 detail survives the masking every response goes through, and the CLI sends
    the settings file's auth_token (which `config show` never prints)."""
    import json

    from kvctl.server.http.app import create_app
    from tests.cliutil import run_cli, serve_app

    app = create_app(ServerSettings(model="none", auth_token=TOKEN))
    with serve_app(app) as url:
        for headers, why in (({}, "has no Authorization header"),
                             (bearer("kvctl-test-token-wrong-guess"), "does not carry")):
            detail = httpx.get(url + "/events", headers=headers).json()["detail"]
            assert "***" not in detail, detail
            assert detail.startswith("authentication required: the ") and why in detail
            assert "Authorization: Bearer <token>" in detail and "KVCTL_AUTH_TOKEN" in detail

        r = run_cli("events", "list", "--controller", url, expected_exit_code=2)
        assert "authentication required" in r.stderr and "***" not in r.stderr
        assert "HTTP 401" in r.stderr and "auth_token" in r.stderr

        cli_env.write_text(f"auth_token: {TOKEN}\n")
        r = run_cli("events", "list", "--controller", url)
        assert r.stdout == "no events\n"
        r = run_cli("config", "show", "--json")
        assert TOKEN not in r.stdout + r.stderr
        shown = json.loads(r.stdout)["settings"]["auth_token"]
        assert shown == {"value": "(set)", "source": str(cli_env)}
