"""`kvctl` through Typer's CliRunner against the real controller app, in-process.

The `cli_server` fixture (conftest) routes the CLI's HTTP client to a Starlette TestClient
of `create_app(ServerSettings(model="none"))`; KV enters the store the way the engine puts
it there (`runtime.store_kv`), with a small random tensor instead of a model's.
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from kvctl import client as kvclient
from kvctl.cli import app
from tests.conftest import free_port

SEED_IDS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"


def kvctl(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def ids_arg(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def store(server, ids: list[int], location: str | None = None) -> None:
    import torch

    gen = torch.Generator().manual_seed(len(ids))
    kv = torch.randn(2, 2, len(ids), 2, 16, generator=gen).to(torch.float16)
    server.state.runtime.store_kv(ids, kv, location)


def ended(server, event_id: str) -> dict:
    ev = server.state.runtime.events.wait(event_id, 60)
    assert ev is not None and ev["status"] in ("finished", "failed")
    return ev


def test_compress_then_decompress_with_wait(cli_server):
    ids = list(range(1000, 1300))  # a full 256-token chunk and a partial one
    store(cli_server, ids)
    r = kvctl("compress", "--tokens", ids_arg(ids), "--wait", "--json")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["status"] == "finished" and ev["op"] == "compress"
    assert ev["num_tokens"] == len(ids) and ev["chunks_done"] == ev["chunks_total"] == 2
    assert 0 < ev["bytes_after"] < ev["bytes_before"]

    r = kvctl("decompress", "--tokens", ids_arg(ids), "--wait", "--json")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["status"] == "finished" and ev["op"] == "decompress"
    assert ev["bytes_after"] > ev["bytes_before"]


def test_seed_ids_schedule_all_twelve_tokens(cli_server):
    store(cli_server, SEED_IDS)
    r = kvctl("compress", "--tokens", ids_arg(SEED_IDS), "--json")
    assert r.exit_code == 0, r.stderr
    reply = json.loads(r.stdout)
    assert set(reply) == {"event_id", "num_tokens"} and reply["num_tokens"] == 12
    assert ended(cli_server, reply["event_id"])["status"] == "finished"


def test_compress_plain_output_names_the_event(cli_server):
    store(cli_server, SEED_IDS)
    r = kvctl("compress", "--tokens", ids_arg(SEED_IDS))
    assert r.exit_code == 0
    assert "compress-" in r.stdout and "12 tokens" in r.stdout
    assert "kvctl events watch" in r.stderr


def test_tokens_file_accepts_a_tokenize_reply_and_stdin(cli_server, tmp_path):
    store(cli_server, SEED_IDS)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"count": 12, "max_model_len": 4096, "tokens": SEED_IDS}))
    r = kvctl("compress", "--tokens-file", str(f), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_tokens"] == 12
    r = kvctl("lookup", "--tokens-file", "-", "--json", input=" ".join(map(str, SEED_IDS)))
    assert r.exit_code == 0
    assert json.loads(r.stdout)["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}


def test_nothing_stored_warns(cli_server):
    r = kvctl("compress", "--tokens", "5,6,7", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_tokens"] == 0
    assert "nothing to do" in r.stderr


def test_events_watch_ends_on_finished(cli_server):
    ids = list(range(2000, 2300))
    store(cli_server, ids)
    reply = json.loads(kvctl("compress", "--tokens", ids_arg(ids), "--json").stdout)
    r = kvctl("events", "watch", reply["event_id"])
    assert r.exit_code == 0, r.stderr
    assert "finished" in r.stdout and "2/2" in r.stdout

    r = kvctl("events", "watch", reply["event_id"], "--json")
    assert r.exit_code == 0
    [ev] = json.loads(r.stdout)
    assert ev["event_id"] == reply["event_id"] and ev["status"] == "finished"


def test_events_list_and_show(cli_server):
    store(cli_server, SEED_IDS)
    reply = json.loads(kvctl("compress", "--tokens", ids_arg(SEED_IDS), "--json").stdout)
    ended(cli_server, reply["event_id"])
    r = kvctl("events", "list", "--json")
    assert r.exit_code == 0
    assert [e["event_id"] for e in json.loads(r.stdout)] == [reply["event_id"]]
    assert json.loads(kvctl("events", "list", "--status", "failed", "--json").stdout) == []
    r = kvctl("events", "list")
    assert r.exit_code == 0 and "finished" in r.stdout

    r = kvctl("events", "show", reply["event_id"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "finished"
    r = kvctl("events", "show", reply["event_id"])
    assert r.exit_code == 0 and "bytes_before" in r.stdout and "ratio" in r.stdout


def test_unknown_event_shows_the_servers_detail(cli_server):
    r = kvctl("events", "show", "nope")
    assert r.exit_code == 1
    assert "unknown event_id 'nope'" in r.stderr and "HTTP 404" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_watch_all_with_nothing_running(cli_server):
    r = kvctl("events", "watch", "--all", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_lookup_pin_move_clear(cli_server):
    ids = list(range(3000, 3300))
    store(cli_server, ids)
    r = kvctl("lookup", "--tokens", ids_arg(ids))
    assert r.exit_code == 0 and "LocalCPUBackend" in r.stdout and "300/300" in r.stdout

    r = kvctl("move", "--tokens", ids_arg(ids), "--to", "LocalDiskBackend", "--wait", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "finished"
    r = kvctl("lookup", "--tokens", ids_arg(ids), "--json")
    assert json.loads(r.stdout)["layout_info"] == {INSTANCE: ["LocalDiskBackend", 300]}

    r = kvctl("pin", "--tokens", ids_arg(ids), "-l", "LocalDiskBackend", "--wait", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["chunks_done"] == 2
    assert cli_server.state.runtime.backends["LocalDiskBackend"].stats().pinned_chunks == 2
    r = kvctl("unpin", "--tokens", ids_arg(ids), "-l", "LocalDiskBackend", "--wait", "--json")
    assert r.exit_code == 0
    assert cli_server.state.runtime.backends["LocalDiskBackend"].stats().pinned_chunks == 0

    r = kvctl("clear", "-l", "LocalDiskBackend", "--wait", "--json")  # no --yes, no answer
    assert r.exit_code == 1
    r = kvctl("clear", "-l", "LocalDiskBackend", "--yes", "--wait", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "finished"
    assert json.loads(kvctl("lookup", "--tokens", ids_arg(ids), "--json").stdout)[
        "layout_info"] == {}


def test_move_needs_a_destination(cli_server):
    r = kvctl("move", "--tokens", "1,2")
    assert r.exit_code == 2 and "--to" in r.stderr


def test_health_workers_codecs(cli_server):
    r = kvctl("health", "--json")
    assert r.exit_code == 0 and set(json.loads(r.stdout)["error_codes"].values()) == {0}
    r = kvctl("health")
    assert r.exit_code == 0 and "healthy" in r.stdout
    r = kvctl("workers", "--json")
    assert r.exit_code == 0
    [w] = json.loads(r.stdout)["workers"]
    assert w["instance_id"] == INSTANCE and w["state"] == "alive"
    r = kvctl("workers")
    assert r.exit_code == 0 and "LocalCPUBackend" in r.stdout
    r = kvctl("codecs", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["default"] == "cachegen"
    r = kvctl("codecs")
    assert "cachegen  (default)" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["compress", "--tokens", "1,2", "--instance-id", "nope"], "unknown instance_id 'nope'"),
    (["compress", "--tokens", "1,2", "--method", "zstd"], "cachegen"),
    (["decompress", "--tokens", "1,2", "--location", "GPU"], "LocalCPUBackend"),
    (["health", "--instance-id", "nope"], "nope"),
])
def test_4xx_shows_detail_and_exits_1(cli_server, args, needle):
    r = kvctl(*args)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [
    ["compress"],
    ["compress", "hello", "--tokens", "1"],
    ["compress", "--tokens", "1,x"],
    ["compress", "--tokens", "-1"],
    ["events", "watch"],
    ["events", "list", "--status", "done"],
])
def test_usage_errors_exit_2(cli_server, args):
    r = kvctl(*args)
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_connection_refused_names_the_url_and_how_to_start(cli_env):
    url = f"http://127.0.0.1:{free_port()}"  # bound, released: nothing listens there now
    r = kvctl("health", "--controller", url)
    assert r.exit_code == 1
    assert f"cannot reach the controller at {url}" in r.stderr
    assert "kvctl serve" in r.stderr and "KVCTL_CONTROLLER" in r.stderr
    assert "Traceback" not in r.stderr


# ---- faults the real server does not produce: a stub transport stands in --------------
def route(handler):
    """Make every ControllerClient talk to ``handler`` (an httpx.MockTransport handler)."""
    seen: list[str] = []

    def factory(url: str, timeout: float) -> httpx.Client:
        seen.append(url)
        return httpx.Client(transport=httpx.MockTransport(handler), base_url=url)

    kvclient.set_http_factory(factory)
    return seen


@pytest.fixture
def stub(cli_env):
    yield route
    kvclient.set_http_factory(None)


def upstream_lmcache(request: httpx.Request) -> httpx.Response:
    """Upstream LMCache's controller: synchronous, no /events, /check_finish raises."""
    path = request.url.path
    if path in ("/compress", "/decompress"):
        return httpx.Response(200, json={"event_id": "ev-1", "num_tokens": 12})
    if path == "/check_finish":
        return httpx.Response(500, text="Internal Server Error")
    return httpx.Response(404, json={"detail": "Not Found"})


def test_wait_explains_a_synchronous_controller(stub):
    stub(upstream_lmcache)
    r = kvctl("decompress", "--tokens", ids_arg(SEED_IDS), "--wait", "--json")
    assert r.exit_code == 0, r.stderr
    assert "does not track events" in r.stderr and "already ended" in r.stderr
    ev = json.loads(r.stdout)
    assert ev["event_id"] == "ev-1" and ev["status"] == "finished" and ev["tracked"] is False


def test_events_watch_explains_a_synchronous_controller(stub):
    stub(upstream_lmcache)
    r = kvctl("events", "watch", "ev-1")
    assert r.exit_code == 0
    assert "finishes each operation before it answers" in r.stderr
    r = kvctl("events", "list")
    assert r.exit_code == 1 and "does not track events" in r.stderr


def test_5xx_shows_detail_and_markup_is_not_interpreted(stub):
    stub(lambda req: httpx.Response(500, json={"detail": "boom [bold]x[/bold]"}))
    r = kvctl("codecs")
    assert r.exit_code == 1
    assert "HTTP 500" in r.stderr and "boom [bold]x[/bold]" in r.stderr


def test_failed_event_exits_1_with_its_error(stub):
    failed = {"event_id": "e", "op": "compress", "status": "failed", "chunks_total": 1,
              "chunks_done": 0, "bytes_before": 0, "bytes_after": 0, "num_tokens": 3,
              "error": "chunk 0 vanished", "created_at": 1.0, "started_at": 1.0,
              "finished_at": 2.0}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/compress":
            return httpx.Response(200, json={"event_id": "e", "num_tokens": 3})
        return httpx.Response(200, json=failed)

    stub(handler)
    r = kvctl("compress", "--tokens", "1,2,3", "--wait", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["status"] == "failed"
    assert "chunk 0 vanished" in r.stderr
    r = kvctl("events", "watch", "e")
    assert r.exit_code == 1 and "chunk 0 vanished" in r.stderr


def test_ctrl_c_stops_watching_with_130(stub):
    running = {"event_id": "e", "status": "running", "chunks_total": 2, "chunks_done": 1}

    def handler(req: httpx.Request) -> httpx.Response:
        if handler.calls:  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        handler.calls += 1  # type: ignore[attr-defined]
        return httpx.Response(200, json=running)

    handler.calls = 0  # type: ignore[attr-defined]
    stub(handler)
    r = kvctl("events", "watch", "e")
    assert r.exit_code == 130 and "keep running" in r.stderr


def test_settings_precedence_flag_env_file(stub, cli_env, monkeypatch):
    seen = stub(lambda req: httpx.Response(200, json={"methods": ["raw"], "default": "raw"}))
    kvctl("codecs")
    cli_env.write_text("controller: http://from-file:1\ntimeout: 5\n")
    kvctl("codecs")
    monkeypatch.setenv("KVCTL_CONTROLLER", "from-env:2")  # host:port as the seeds write it
    kvctl("codecs")
    kvctl("codecs", "--controller", "http://from-flag:3/")
    assert seen == ["http://localhost:9000", "http://from-file:1", "http://from-env:2",
                    "http://from-flag:3"]


def test_bad_settings_file_is_one_line(stub, cli_env):
    stub(lambda req: httpx.Response(200, json={}))
    cli_env.write_text("controler: http://x\n")
    r = kvctl("codecs")
    assert r.exit_code == 1 and "unknown key(s) controler" in r.stderr


def test_unexpected_exception_is_one_line_unless_debug(stub, monkeypatch):
    def handler(req: httpx.Request) -> httpx.Response:
        raise RuntimeError("kaboom")

    stub(handler)
    r = kvctl("codecs")
    assert r.exit_code == 1 and "kaboom" in r.stderr and "KVCTL_DEBUG=1" in r.stderr
    monkeypatch.setenv("KVCTL_DEBUG", "1")
    r = kvctl("codecs")
    assert isinstance(r.exception, RuntimeError)


def test_instance_id_from_the_settings_file(cli_server, cli_env):
    cli_env.write_text("instance_id: from-file\n")
    r = kvctl("compress", "--tokens", "1,2")
    assert r.exit_code == 1 and "unknown instance_id 'from-file'" in r.stderr
    r = kvctl("compress", "--tokens", "1,2", "--instance-id", INSTANCE, "--json")
    assert r.exit_code == 0


def test_tokenizer_from_env_is_used_for_prompts(cli_server, monkeypatch):
    store(cli_server, SEED_IDS)
    monkeypatch.setenv("KVCTL_TOKENIZER", "llama3")
    r = kvctl("compress", "Explain the significance of KV cache in language models.", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["num_tokens"] == 12
