"""The MP-fleet CLI against kvctl's coordinator app on a loopback port (no LMCache needed):
the token, a URL that is no coordinator, and one-line errors with the documented codes."""

from __future__ import annotations

import json

import httpx
import pytest

from kvctl.server.config import ServerSettings
from kvctl.server.coordinator.app import create_coordinator_app
from tests.cliutil import run_cli, serve_app

TOKEN = "cli-coordinator-token-0123456789"


@pytest.fixture
def secured(cli_env):
    app = create_coordinator_app(ServerSettings(coordinator_port=0, auth_token=TOKEN))
    with serve_app(app) as url:
        r = httpx.post(url + "/instances", json={"instance_id": "srv-1", "ip": "127.0.0.1",
                                                 "http_port": 1})
        assert r.status_code == 200  # a server on loopback registers without the token
        yield url


def test_instances_needs_the_token_and_lists_with_it(secured, monkeypatch):
    r = run_cli("instances", "--coordinator", secured, expected_exit_code=2)
    assert "HTTP 401" in r.stderr and "KVCTL_AUTH_TOKEN" in r.stderr
    assert TOKEN not in r.stderr
    monkeypatch.setenv("KVCTL_AUTH_TOKEN", TOKEN)
    data = json.loads(run_cli("instances", "--coordinator", secured, "--json").stdout)
    assert data["coordinator"] == "kvctl"
    assert [i["instance_id"] for i in data["instances"]] == ["srv-1"]
    assert data["instances"][0]["cursor"] is None and data["instances"][0]["alive"]
    r = run_cli("lookup", "--tokens", ",".join(["1"] * 512), "--coordinator", secured,
                "--model-name", "m", expected_exit_code=2)
    assert "nothing matched" in r.stderr
    # registered, but nothing listens at its address: the coordinator's 502 is exit 1
    r = run_cli("prefetch", "--tokens", "1,2", "--coordinator", secured, "--model-name",
                "m", "--instance", "srv-1", expected_exit_code=1)
    assert "HTTP 502" in r.stderr and "prefetch submit to 'srv-1' failed" in r.stderr
    r = run_cli("delete", "--tokens", "1", "--coordinator", secured, "--model-name", "m",
                "--instance", "srv-1", "--tier", "l3", expected_exit_code=2)
    assert "--tier must be l1, l2 or all" in r.stderr


def test_a_url_that_is_no_coordinator(cli_server):
    r = run_cli("instances", "--coordinator", cli_server.state.url, expected_exit_code=1)
    assert "not an LMCache MP coordinator" in r.stderr


def test_an_unreachable_coordinator(cli_env):
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli("instances", "--coordinator", url, expected_exit_code=1)
    assert "cannot reach the coordinator" in r.stderr
