"""`kvctl` through Typer's CliRunner against the real controller app on a loopback port.

The `cli_server` fixture (conftest) serves `create_app(ServerSettings(model="none"))` with
uvicorn and points KVCTL_CONTROLLER at it; KV enters the store the way the engine puts it
there (`runtime.store_kv`), with a small random tensor instead of a model's.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse

from tests.cliutil import INSTANCE, SEED_IDS, SEED_PROMPT, run_cli, serve_app
from tests.conftest import free_port


def ids_arg(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def store(server, ids: list[int]) -> None:
    """Into every tier of the server's worker, as the engine stores a prompt's KV."""
    import torch

    gen = torch.Generator().manual_seed(len(ids))
    kv = torch.randn(2, 2, len(ids), 2, 16, generator=gen).to(torch.float16)
    server.state.runtime.store_kv(ids, kv)


def ended(server, event_id: str) -> dict:
    ev = server.state.runtime.events.wait(event_id, 60)
    assert ev is not None and ev["status"] in ("finished", "failed")
    return ev


def chunks_in(server, location: str) -> int:
    return server.state.runtime.backends[location].stats().chunks


# ---------------------------------------------------------------- cache operations ----
def test_compress_then_decompress_with_wait(cli_server):
    ids = list(range(1000, 1300))  # a full 256-token chunk and a partial one
    store(cli_server, ids)
    r = run_cli("compress", "--tokens", ids_arg(ids), "--wait", "--json")
    ev = json.loads(r.stdout)
    assert ev["status"] == "finished" and ev["op"] == "compress"
    assert ev["num_tokens"] == len(ids) and ev["chunks_done"] == ev["chunks_total"] == 2
    assert 0 < ev["bytes_after"] < ev["bytes_before"]

    r = run_cli("decompress", "--tokens", ids_arg(ids), "--wait", "--json")
    ev = json.loads(r.stdout)
    assert ev["status"] == "finished" and ev["op"] == "decompress"
    assert ev["bytes_after"] > ev["bytes_before"]


def test_seed_ids_schedule_all_twelve_tokens(cli_server):
    store(cli_server, SEED_IDS)
    reply = json.loads(run_cli("compress", "--tokens", ids_arg(SEED_IDS), "--json").stdout)
    assert set(reply) == {"event_id", "num_tokens"} and reply["num_tokens"] == 12
    assert ended(cli_server, reply["event_id"])["status"] == "finished"


def test_compress_plain_output_names_the_event_and_its_short_id(cli_server):
    store(cli_server, SEED_IDS)
    r = run_cli("compress", "--tokens", ids_arg(SEED_IDS))
    [event] = cli_server.state.runtime.events.list()
    assert r.stdout == f"compress of 12 tokens scheduled: event {event['event_id']} " \
                       "(12 tokens)\n"
    short = event["event_id"].removeprefix("compress-")[:8]
    assert r.stderr == f"follow it with: kvctl events watch {short}\n"


def test_tokens_file_accepts_a_tokenize_reply_and_stdin(cli_server, tmp_path):
    store(cli_server, SEED_IDS)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"count": 12, "max_model_len": 4096, "tokens": SEED_IDS}))
    r = run_cli("compress", "--tokens-file", str(f), "--json")
    assert json.loads(r.stdout)["num_tokens"] == 12
    r = run_cli("lookup", "--tokens-file", "-", "--json", input=" ".join(map(str, SEED_IDS)))
    assert json.loads(r.stdout)["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}


def test_prompt_is_tokenized_with_the_global_tokenizer(cli_server):
    store(cli_server, SEED_IDS)
    r = run_cli("--tokenizer", "llama3", "compress", SEED_PROMPT, "--json")
    assert json.loads(r.stdout)["num_tokens"] == 12


def test_tokenizer_from_env_is_used_for_prompts(cli_server, monkeypatch):
    store(cli_server, SEED_IDS)
    monkeypatch.setenv("KVCTL_TOKENIZER", "llama3")
    r = run_cli("compress", SEED_PROMPT, "--json")
    assert json.loads(r.stdout)["num_tokens"] == 12


def test_lookup_pin_move_clear(cli_server):
    ids = list(range(3000, 3300))
    store(cli_server, ids)
    r = run_cli("lookup", "--tokens", ids_arg(ids))
    assert "LocalCPUBackend" in r.stdout and "300/300" in r.stdout

    r = run_cli("move", "--tokens", ids_arg(ids), "--to", "LocalDiskBackend", "--wait",
                "--json")
    assert json.loads(r.stdout)["status"] == "finished"
    r = run_cli("lookup", "--tokens", ids_arg(ids), "--json")
    assert json.loads(r.stdout)["layout_info"] == {INSTANCE: ["LocalDiskBackend", 300]}

    r = run_cli("pin", "--tokens", ids_arg(ids), "-l", "LocalDiskBackend", "--wait", "--json")
    assert json.loads(r.stdout)["chunks_done"] == 2
    assert cli_server.state.runtime.backends["LocalDiskBackend"].stats().pinned_chunks == 2
    run_cli("unpin", "--tokens", ids_arg(ids), "-l", "LocalDiskBackend", "--wait", "--json")
    assert cli_server.state.runtime.backends["LocalDiskBackend"].stats().pinned_chunks == 0


def test_clear_asks_first_and_keeps_the_chunks_when_told_no(cli_server):
    ids = list(range(3000, 3300))
    store(cli_server, ids)
    assert chunks_in(cli_server, "LocalDiskBackend") == 2
    for answer in ("n\n", "\n", ""):  # no, the default (no), and no answer at all
        r = run_cli("clear", "-l", "LocalDiskBackend", expected_exit_code=1, input=answer)
        assert f"Remove every chunk of {INSTANCE} in LocalDiskBackend" in r.stderr
        assert chunks_in(cli_server, "LocalDiskBackend") == 2
    assert cli_server.state.runtime.events.list() == []  # nothing was even scheduled

    r = run_cli("clear", "-l", "LocalDiskBackend", "--yes", "--wait", "--json")
    assert json.loads(r.stdout)["status"] == "finished"
    assert chunks_in(cli_server, "LocalDiskBackend") == 0


def test_clear_confirmed_interactively(cli_server):
    store(cli_server, SEED_IDS)
    run_cli("clear", "--wait", input="y\n")
    assert chunks_in(cli_server, "LocalCPUBackend") == 0


# ------------------------------------------------------------------ exit codes ----
def test_nothing_matched_is_one_line_and_exit_2(cli_server):
    r = run_cli("compress", "--tokens", "5,6,7", expected_exit_code=2)
    assert r.stdout == ""
    assert r.stderr == ("error: nothing matched: none of the 3 tokens has stored KV in "
                        f"LocalCPUBackend for {INSTANCE}, so nothing was scheduled "
                        "(`kvctl lookup` shows where a prompt's KV is)\n")
    # --wait does not wait for nothing, and --json still gets the controller's reply
    r = run_cli("compress", "--tokens", "5,6,7", "--wait", "--json", expected_exit_code=2)
    assert json.loads(r.stdout)["num_tokens"] == 0 and len(r.stderr.splitlines()) == 1
    r = run_cli("lookup", "--tokens", "5,6,7", expected_exit_code=2)
    assert r.stderr == "error: nothing matched: no stored KV for any prefix of these 3 tokens\n"
    run_cli("pin", "--tokens", "5,6,7", expected_exit_code=2)


def test_a_never_cached_prompt_is_rejected(cli_server):
    r = run_cli("-t", "llama3", "decompress", SEED_PROMPT, "--wait", expected_exit_code=2)
    assert r.stderr.startswith("error: nothing matched: none of the 12 tokens")


@pytest.mark.parametrize("args,needle", [
    (["compress", "--tokens", "1,2", "--instance-id", "nope"], "unknown instance_id 'nope'"),
    (["compress", "--tokens", "1,2", "--method", "zstd"], "cachegen"),
    (["decompress", "--tokens", "1,2", "--location", "GPU"], "LocalCPUBackend"),
    (["health", "--instance-id", "nope"], "nope"),
    (["events", "show", "nope"], "unknown event_id 'nope'"),
])
def test_4xx_is_rejected_with_the_servers_detail(cli_server, args, needle):
    r = run_cli(*args, expected_exit_code=2)
    assert r.stderr.startswith("error: ") and needle in r.stderr and "(HTTP 4" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["compress"], "error: give the tokens one way: a PROMPT (or '-' for stdin), --tokens "
                   "1,2,3, or --tokens-file FILE"),
    (["compress", "hello", "--tokens", "1"], "error: give the tokens one way: a PROMPT (or "
                                             "'-' for stdin), --tokens 1,2,3, or "
                                             "--tokens-file FILE (got PROMPT and --tokens)"),
    (["compress", "--tokens", "1,x"], "error: --tokens: token ids are integers separated by "
                                      "commas or spaces"),
    (["compress", "--tokens", "-1"], "error: --tokens: token ids cannot be negative"),
    (["compress", ""], "error: the prompt is empty"),
    (["move", "--tokens", "1,2"], "error: move needs a destination: --to LOCATION"),
    (["move", "--tokens", "1,2", "--to", "LocalCPUBackend"],
     f"error: source and destination are both {INSTANCE}/LocalCPUBackend"),
    (["events", "watch"], "error: name the events to watch (kvctl events watch ID ...) or "
                          "pass --all"),
    (["events", "list", "--status", "done"], "error: --status must be one of queued, "
                                             "running, finished, failed, got 'done'"),
    (["--timeout", "0", "health"], "error: timeout from --timeout must be > 0, got 0"),
    (["tokenize", ""], "error: the prompt is empty"),
    (["serve", "--port", "70000"], "error: settings: port: Input should be less than or equal "
                                   "to 65535 (got 70000)"),
])
def test_usage_errors_exit_2_with_their_message(cli_server, args, message):
    r = run_cli(*args, expected_exit_code=2)
    assert r.stderr == message + "\n" and r.stdout == ""


def squash(text: str) -> str:
    """Click's usage errors come in a Rich box, folded at 80 columns: the words alone."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_click_usage_errors_exit_2(cli_env):
    r = run_cli("compress", "--no-such-flag", expected_exit_code=2)
    assert "No such option: --no-such-flag" in squash(r.stderr)
    r = run_cli("--timeout", "soon", "health", expected_exit_code=2)
    assert "Invalid value for '--timeout': Input should be a valid number" in squash(r.stderr)
    r = run_cli("health", "--timeout", "soon", expected_exit_code=2)  # after the command
    assert "Invalid value for '--timeout': Input should be a valid number" in squash(r.stderr)
    r = run_cli("events", "list", "--limit", "0", expected_exit_code=2)
    assert ("Invalid value for '--limit' / '-n': Input should be greater than or equal to 1"
            in squash(r.stderr))


def test_connection_refused_names_the_url_and_how_to_start(cli_env):
    url = f"http://127.0.0.1:{free_port()}"  # bound, released: nothing listens there now
    r = run_cli("health", "--controller", url, expected_exit_code=1)
    assert r.stderr == (f"error: cannot reach the controller at {url} — start one with "
                        "`kvctl serve` (or `make serve`), or pass --controller / set "
                        "KVCTL_CONTROLLER\n")


# ------------------------------------------------------------------------ events ----
def test_events_watch_ends_on_finished(cli_server):
    ids = list(range(2000, 2300))
    store(cli_server, ids)
    reply = json.loads(run_cli("compress", "--tokens", ids_arg(ids), "--json").stdout)
    r = run_cli("events", "watch", reply["event_id"])
    assert "finished" in r.stdout and "2/2" in r.stdout

    r = run_cli("events", "watch", reply["event_id"], "--json")
    [ev] = json.loads(r.stdout)
    assert ev["event_id"] == reply["event_id"] and ev["status"] == "finished"


def test_events_list_and_show(cli_server):
    store(cli_server, SEED_IDS)
    reply = json.loads(run_cli("compress", "--tokens", ids_arg(SEED_IDS), "--json").stdout)
    ended(cli_server, reply["event_id"])
    r = run_cli("events", "list", "--json")
    assert [e["event_id"] for e in json.loads(r.stdout)] == [reply["event_id"]]
    assert json.loads(run_cli("events", "list", "--status", "failed", "--json").stdout) == []
    r = run_cli("events", "list", "--status", "failed")
    assert r.stdout == "no events with status failed\n"
    r = run_cli("events", "list")
    assert "finished" in r.stdout and "cachegen" in r.stdout

    r = run_cli("events", "show", reply["event_id"], "--json")
    assert json.loads(r.stdout)["status"] == "finished"
    r = run_cli("events", "show", reply["event_id"])
    assert "bytes_before" in r.stdout and "ratio" in r.stdout


def test_short_ids_are_accepted_everywhere_an_id_is(cli_server):
    store(cli_server, SEED_IDS)
    reply = json.loads(run_cli("compress", "--tokens", ids_arg(SEED_IDS), "--json").stdout)
    full = reply["event_id"]
    ended(cli_server, full)
    short = full.removeprefix("compress-")[:8]
    listed = run_cli("events", "list").stdout
    assert short in listed and full not in listed  # the table shows the short form
    for ident in (short, short[:3], full[:12], full):
        r = run_cli("events", "show", ident, "--json")
        assert json.loads(r.stdout)["event_id"] == full
        [ev] = json.loads(run_cli("events", "watch", ident, "--json").stdout)
        assert ev["event_id"] == full


def test_ambiguous_prefix_is_rejected_with_the_candidates(cli_server):
    store(cli_server, SEED_IDS)
    by_first: dict[str, list[str]] = {}
    # Create events until two random parts start with the same hex digit (at most 15 that
    # count). "c" and "d" do not count: every "compress-..." id starts with "c" itself.
    while not any(len(v) > 1 for v in by_first.values()):
        assert len(cli_server.state.runtime.events.list()) < 200
        eid = json.loads(run_cli("compress", "--tokens", ids_arg(SEED_IDS),
                                 "--json").stdout)["event_id"]
        first = eid.removeprefix("compress-")[0]
        if first not in "cd":
            by_first.setdefault(first, []).append(eid)
    digit, same = next((d, ids) for d, ids in by_first.items() if len(ids) > 1)
    r = run_cli("events", "show", digit, expected_exit_code=2)
    assert f"event id prefix '{digit}' matches {len(same)} events" in r.stderr
    assert "give more characters (HTTP 409" in r.stderr
    assert all(e in r.stderr for e in same)
    r = run_cli("events", "show", "c", expected_exit_code=2)  # every compress-... id
    assert "event id prefix 'c' matches" in r.stderr
    r = run_cli("events", "show", "zz", expected_exit_code=2)
    assert "unknown event_id 'zz'" in r.stderr and "(HTTP 404" in r.stderr


def test_watch_all_with_nothing_running(cli_server):
    r = run_cli("events", "watch", "--all", "--json")
    assert json.loads(r.stdout) == [] and "no event is queued or running" in r.stderr


# ------------------------------------------------------------------------ cluster ----
def test_health_workers_codecs(cli_server):
    r = run_cli("health", "--json")
    assert json.loads(r.stdout)["instances"][INSTANCE]["error_codes"] == {"0": 0}
    assert "healthy" in run_cli("health").stdout
    [w] = json.loads(run_cli("workers", "--json").stdout)["workers"]
    assert w["instance_id"] == INSTANCE and w["state"] == "alive"
    assert "LocalCPUBackend" in run_cli("workers").stdout
    assert json.loads(run_cli("codecs", "--json").stdout)["default"] == "cachegen"
    assert "cachegen  (default)\n" in run_cli("codecs").stdout


# --------------------------------------------------- global options and settings ----
def test_global_options_before_or_after_the_command(cli_server):
    url = cli_server.state.url
    for args in (["--json", "--controller", url, "codecs"],
                 ["codecs", "--json", "--controller", url],
                 ["--controller", url, "codecs", "--json"],
                 ["codecs", f"--controller={url}", "--json"]):
        assert json.loads(run_cli(*args).stdout)["default"] == "cachegen", args
    assert json.loads(run_cli("events", "list", "--json").stdout) == []
    assert json.loads(run_cli("--json", "events", "list").stdout) == []
    # a prompt that merely looks like an option after `--` stays the prompt
    from kvctl.common.tokenizers import load_tokenizer

    r = run_cli("--json", "tokenize", "-t", "llama3", "--", "--json")
    assert load_tokenizer("llama3").decode(json.loads(r.stdout)["tokens"]) == "--json"


def test_global_option_the_subcommand_also_has_goes_to_the_subcommand():
    import typer

    from kvctl.cli import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    hoist = group._hoist  # type: ignore[attr-defined]
    # bench has its own --json: it keeps it, wherever it was given
    assert hoist(ctx, ["--json", "bench", "--codec", "raw"]) == [
        "bench", "--json", "--codec", "raw"]
    assert hoist(ctx, ["bench", "--json", "--controller", "u"]) == [
        "--controller", "u", "bench", "--json"]
    assert hoist(ctx, ["events", "watch", "x", "--timeout", "3", "-t", "llama3"]) == [
        "--timeout", "3", "-t", "llama3", "events", "watch", "x"]
    assert hoist(ctx, ["nosuch", "--json"]) == ["nosuch", "--json"]


def test_settings_precedence_flag_env_file(cli_server, cli_env, monkeypatch):
    url = cli_server.state.url
    monkeypatch.delenv("KVCTL_CONTROLLER")
    cli_env.write_text(f"controller: {url}\ntimeout: 5\ninstance_id: from-file\n")
    r = run_cli("config", "show", "--json")
    data = json.loads(r.stdout)
    assert data["config_file"] == str(cli_env)
    assert data["settings"] == {
        "controller": {"value": url, "source": str(cli_env)},
        "timeout": {"value": 5.0, "source": str(cli_env)},
        "tokenizer": {"value": "smollm2", "source": "default"},
        "instance_id": {"value": "from-file", "source": str(cli_env)},
        "auth_token": {"value": None, "source": "default"},
        "coordinator": {"value": None, "source": "default"}}
    # the file's controller is the one used; its instance is unknown there
    r = run_cli("compress", "--tokens", "1,2", expected_exit_code=2)
    assert "unknown instance_id 'from-file'" in r.stderr

    monkeypatch.setenv("KVCTL_INSTANCE_ID", INSTANCE)
    monkeypatch.setenv("KVCTL_TIMEOUT", "7")
    monkeypatch.setenv("KVCTL_CONTROLLER", url.removeprefix("http://"))  # host:port
    r = run_cli("config", "show", "--tokenizer", "llama3", "--json")
    s = json.loads(r.stdout)["settings"]
    assert s["controller"] == {"value": url, "source": "KVCTL_CONTROLLER"}
    assert s["timeout"] == {"value": 7.0, "source": "KVCTL_TIMEOUT"}
    assert s["instance_id"] == {"value": INSTANCE, "source": "KVCTL_INSTANCE_ID"}
    assert s["tokenizer"] == {"value": "llama3", "source": "--tokenizer"}
    run_cli("compress", "--tokens", "1,2", expected_exit_code=2)  # nothing stored: rejected

    r = run_cli("config", "show", "--controller", "http://elsewhere:1/")
    assert "http://elsewhere:1 " in r.stdout and "--controller" in r.stdout
    assert f"config file: {cli_env}" in r.stderr


def test_config_path_and_missing_file(cli_env):
    assert run_cli("config", "path").stdout == f"{cli_env}\n"
    r = run_cli("config", "show")
    assert "http://localhost:9000" in r.stdout and "default" in r.stdout
    assert r.stderr == f"config file: {cli_env} (not present)\n"


def test_bad_settings_file_is_one_line(cli_env):
    cli_env.write_text("controler: http://x\n")
    r = run_cli("codecs", expected_exit_code=1)
    assert r.stderr == (f"error: config file {cli_env}: unknown key(s) controler; known: "
                        "controller, timeout, tokenizer, instance_id, auth_token, coordinator\n")
    run_cli("codecs", "--help")  # help still works


# -------------------------------- servers kvctl meets that are not its controller ----
def upstream_lmcache_app() -> FastAPI:
    """Upstream LMCache's controller as the CLI sees it: synchronous, no /events, and a
    /check_finish that fails (it was never implemented there)."""
    app = FastAPI()  # upstream keeps FastAPI's default title

    @app.post("/compress")
    @app.post("/decompress")
    async def op() -> dict:
        return {"event_id": "ev-1", "num_tokens": 12}

    @app.post("/lookup")
    async def lookup() -> dict:
        return {"event_id": "ev-2", "layout_info": {}}

    @app.post("/check_finish")
    async def check_finish() -> dict:
        raise RuntimeError("not implemented")

    return app


@pytest.fixture
def upstream(cli_env):
    with serve_app(upstream_lmcache_app()) as url:
        yield url


def test_wait_explains_a_synchronous_controller(upstream):
    r = run_cli("decompress", "--tokens", ids_arg(SEED_IDS), "--wait", "--json",
                "--controller", upstream)
    assert "does not track events" in r.stderr and "already ended" in r.stderr
    ev = json.loads(r.stdout)
    assert ev["event_id"] == "ev-1" and ev["status"] == "finished" and ev["tracked"] is False


def test_events_watch_that_cannot_follow_exits_1(upstream):
    r = run_cli("events", "watch", "ev-1", "--controller", upstream, expected_exit_code=1)
    assert r.stderr.startswith("error: cannot follow event ev-1: the controller at "
                               f"{upstream} does not track events (it is upstream LMCache's")
    r = run_cli("events", "list", "--controller", upstream, expected_exit_code=1)
    assert "has no event list" in r.stderr
    r = run_cli("codecs", "--controller", upstream, expected_exit_code=1)
    assert "upstream LMCache's has no /codecs" in r.stderr


@pytest.fixture
def engine_url(cli_env):
    from kvctl.server.config import ServerSettings
    from kvctl.server.engine.core import create_engine_app
    from kvctl.server.worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(ServerSettings(model="none"))
    # a model file that does not exist: the engine app serves its routes without loading
    app = create_engine_app(runtime, "/nonexistent/model.gguf")
    try:
        with serve_app(app) as url:
            yield url
    finally:
        runtime.close()


@pytest.fixture
def monitor_url(cli_server):
    from kvctl.server.runner import create_monitor_app

    with serve_app(create_monitor_app(cli_server)) as url:
        yield url


@pytest.mark.parametrize("args", [["compress", "--tokens", "1,2"], ["events", "watch", "x"],
                                  ["events", "list"], ["health"], ["codecs"]])
def test_the_engine_port_is_named(engine_url, args):
    r = run_cli(*args, "--controller", engine_url, expected_exit_code=1)
    assert r.stderr.startswith(f"error: {engine_url} is an inference engine "
                               "(OpenAI-compatible API), not a kvctl controller (it has no /")
    assert "port 9000 by default" in r.stderr and len(r.stderr.splitlines()) == 1


def test_the_monitor_port_is_named(monitor_url):
    r = run_cli("compress", "--tokens", "1,2", "--controller", monitor_url,
                expected_exit_code=1)
    assert r.stderr.startswith(f"error: {monitor_url} is kvctl's monitor port (metrics and "
                               "events, read-only), not a kvctl controller (it has no "
                               "/compress)")
    # events are served there too, so following them works
    assert json.loads(run_cli("events", "list", "--json", "--controller",
                              monitor_url).stdout) == []


def test_something_else_is_named(cli_env):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("hello")

    with serve_app(Starlette(routes=[Route("/", hello)])) as url:
        r = run_cli("compress", "--tokens", "1,2", "--controller", url, expected_exit_code=1)
    assert r.stderr == (f"error: {url} is a server that is not a kvctl controller (no "
                        "OpenAPI description at /openapi.json), not a kvctl controller (it "
                        "has no /compress); point --controller (or KVCTL_CONTROLLER) at the "
                        "controller, which `kvctl serve` starts on port 9000 by default\n")


# ------------------------------------------ faults the real controller does not make ----
def faulty_app() -> FastAPI:
    app = FastAPI(title="kvctl controller")  # claims to be one, then misbehaves

    @app.get("/codecs")
    async def codecs() -> JSONResponse:
        return JSONResponse({"detail": "boom [bold]x[/bold]"}, status_code=500)

    @app.post("/health")
    async def health() -> HTMLResponse:
        return HTMLResponse("<html>proxy error</html>")

    @app.get("/workers")
    async def workers() -> list:
        return [1, 2]  # not the object the API promises

    @app.get("/events")
    async def events() -> dict:
        return {"events": [1, 2]}  # events that are not objects

    failed = {"event_id": "e", "op": "compress", "status": "failed", "chunks_total": 1,
              "chunks_done": 0, "bytes_before": 0, "bytes_after": 0, "num_tokens": 3,
              "error": "chunk 0 [red]vanished[/red]", "created_at": 1.0, "started_at": 1.0,
              "finished_at": 2.0}

    @app.post("/compress")
    async def compress() -> dict:
        return {"event_id": "e", "num_tokens": 3}

    @app.get("/events/{event_id}")
    async def event(event_id: str) -> dict:
        if event_id != "e":
            raise HTTPException(404, f"unknown event_id {event_id!r}")
        return failed

    return app


@pytest.fixture
def faulty(cli_env, monkeypatch):
    with serve_app(faulty_app()) as url:
        monkeypatch.setenv("KVCTL_CONTROLLER", url)
        yield url


def test_5xx_shows_detail_and_markup_is_not_interpreted(faulty):
    r = run_cli("codecs", expected_exit_code=1)
    assert r.stderr == ("error: the controller failed on /codecs (HTTP 500): "
                        "boom [bold]x[/bold]\n")


def test_non_json_reply_from_a_controller(faulty):
    r = run_cli("--instance-id", "i", "health", expected_exit_code=1)
    assert r.stderr.startswith(f"error: the controller at {faulty} answered /health with "
                               "something that is not JSON: '<html>proxy error</html>'")


def test_failed_event_exits_1_with_its_error(faulty):
    r = run_cli("compress", "--tokens", "1,2,3", "--wait", "--json", expected_exit_code=1)
    assert json.loads(r.stdout)["status"] == "failed"
    assert r.stderr == "error: event e failed: chunk 0 [red]vanished[/red]\n"
    r = run_cli("events", "watch", "e", expected_exit_code=1)
    assert "chunk 0 [red]vanished[/red]" in r.stderr


def test_unexpected_exception_is_one_line_unless_debug(faulty, monkeypatch):
    r = run_cli("events", "list", expected_exit_code=1)
    assert r.stderr.startswith("error: unexpected AttributeError: ")
    assert r.stderr.endswith("(this is a kvctl bug; rerun with KVCTL_DEBUG=1 for the "
                             "traceback)\n")
    monkeypatch.setenv("KVCTL_DEBUG", "1")
    r = run_cli("events", "list", expected_exit_code=1)
    assert isinstance(r.exception, AttributeError)


def test_a_worker_list_that_is_not_one_is_one_line(faulty):
    r = run_cli("workers", expected_exit_code=1)
    assert r.stderr.startswith(f"error: the controller at {faulty} answered /workers with "
                               "something that is not a worker list: ")


def test_timeout_names_the_path_and_the_setting(cli_env):
    import asyncio

    app = FastAPI(title="kvctl controller")

    @app.get("/codecs")
    async def slow() -> dict:
        await asyncio.sleep(3)
        return {}

    with serve_app(app) as url:
        r = run_cli("codecs", "--controller", url, "--timeout", "0.2", expected_exit_code=1)
    assert r.stderr == (f"error: the controller at {url} did not answer /codecs within 0.2 s "
                        "(raise --timeout or KVCTL_TIMEOUT)\n")


def test_ctrl_c_stops_watching_with_130(cli_env):
    """SIGINT to a real `kvctl events watch` process following an event that never ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    polls: list[str] = []
    app = FastAPI(title="kvctl controller")

    @app.get("/events/{event_id}")
    async def event(event_id: str) -> dict:
        polls.append(event_id)
        return {"event_id": "e", "op": "compress", "status": "running", "chunks_total": 2,
                "chunks_done": 1}

    with serve_app(app) as url:
        proc = subprocess.Popen([sys.executable, "-m", "kvctl", "events", "watch", "e",
                                 "--controller", url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ),
                                # A background job of a non-interactive shell (CI) inherits
                                # SIGINT ignored, and Python keeps it ignored: reset it.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while len(polls) < 2:  # the initial read and at least one poll: it is watching
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    assert err == "error: stopped watching; the events keep running on the controller\n"


# ------------------------------------------------------------- small new-user finds ----
def test_watch_piped_ends_with_a_newline(cli_server):
    ids = list(range(1000, 1300))
    store(cli_server, ids)
    ev = json.loads(run_cli("compress", "--tokens", ids_arg(ids), "--json").stdout)
    ended(cli_server, ev["event_id"])
    r = run_cli("events", "watch", ev["event_id"])
    assert r.stdout.endswith("\n") and "finished" in r.stdout.splitlines()[-1]


def test_several_controllers_or_a_bad_url_is_a_usage_error(cli_env):
    r = run_cli("--controller", "localhost:9000,localhost:9100", "codecs",
                expected_exit_code=2)
    assert r.stderr.startswith("error: controller from --controller: "
                               "'localhost:9000,localhost:9100' names several addresses")
    assert "unexpected" not in r.stderr
    r = run_cli("--controller", "ftp://x", "codecs", expected_exit_code=2)
    assert r.stderr == ("error: controller from --controller: 'ftp://x' is not an http(s) "
                        "URL or host:port\n")


def test_events_show_of_an_empty_id_says_so(cli_env):
    r = run_cli("events", "show", "", expected_exit_code=2)
    assert r.stderr.startswith("error: the event id is empty")


def test_config_path_json(cli_env):
    assert json.loads(run_cli("config", "path", "--json").stdout) == {
        "config_file": str(cli_env), "exists": False}
    cli_env.write_text("timeout: 3\n")
    assert json.loads(run_cli("--json", "config", "path").stdout)["exists"] is True
    assert run_cli("config", "path").stdout == f"{cli_env}\n"


def test_get_health_answers(cli_server):
    import httpx

    r = httpx.get(cli_server.state.url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "error_codes": {f"{INSTANCE}/0": 0}}
