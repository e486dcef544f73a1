"""`kvctl bench`: the table, JSON, plot and markdown outputs, and its one-line errors;
the second embedded model (Gemma 3) and the text suite."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    # the real root: it prints bench's errors, as every command's (kvctl/cli.py)
    from kvctl.cli import app

    return app


@pytest.fixture(scope="module")
def kv_file(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    kv = torch.randn(4, 2, 300, 2, 16, generator=g).half()
    path = tmp_path_factory.mktemp("kv") / "kv.safetensors"
    save_file({"kv": kv}, str(path))
    return path


def test_bench_on_saved_kv_json(app, kv_file):
    r = CliRunner().invoke(app, ["bench", "--kv", str(kv_file), "--codec", "raw", "--codec",
                                 "cachegen", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["shape"] == [4, 2, 300, 2, 16]
    raw, cg = rep["results"]
    assert raw["method"] == "raw" and raw["rel_error"] == 0 and raw["ratio"] < 1.0
    assert cg["method"] == "cachegen" and cg["ratio"] > 3 and cg["top1"] is None


def test_plain_bench_reports_progress_on_stderr(app, kv_file):
    r = CliRunner().invoke(app, ["bench", "--kv", str(kv_file), "--codec", "raw", "--codec",
                                 "int8", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    steps = [ln.split("] ", 1)[1] for ln in r.stderr.splitlines()]
    assert steps[0] == "2 codecs, 1 timed run(s) each"
    assert [s.split(",")[0] for s in steps[1:]] == ["raw (1/2)", "int8 (2/2)"]
    assert "int8" in r.stdout and "timed run" not in r.stdout  # results alone on stdout
    # --json (bench's own, or the global one before the command): one document on stdout
    for args in (["bench", "--json"], ["--json", "bench"]):
        r = CliRunner().invoke(app, [*args, "--kv", str(kv_file), "--codec", "raw",
                                     "--repeats", "1"])
        assert r.exit_code == 0 and json.loads(r.stdout)["results"][0]["method"] == "raw"


def test_bench_errors_are_one_line(app, kv_file, tmp_path):
    r = CliRunner().invoke(app, ["bench", "--codec", "gzip"])
    assert r.exit_code == 2 and "unknown method 'gzip'" in r.output
    r = CliRunner().invoke(app, ["bench", "--kv", str(kv_file), "--text", str(kv_file)])
    assert r.exit_code == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    r = CliRunner().invoke(app, ["bench", "--kv", str(bad)])
    assert r.exit_code == 1 and r.output.startswith("error: cannot read KV file")
    assert "Traceback" not in r.output


@pytest.mark.model
def test_bench_on_text_with_the_model(app, tmp_path, lm):
    from kvctl.common import bench as b

    text = tmp_path / "t.txt"
    text.write_text(b.DEFAULT_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    png, md = tmp_path / "r.png", tmp_path / "r.md"
    r = CliRunner().invoke(app, ["bench", "--text", str(text), "--prefix", "96",
                                 "--continuation", "48", "--chunk-size", "64", "--repeats", "1",
                                 "--codec", "raw", "--codec", "cachegen", "--codec", "kivi-2",
                                 "--plot", str(png), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    assert "cachegen" in r.stdout and "top-1" in r.stdout
    # progress on stderr from the start: the model load, then each codec
    lines = r.stderr.splitlines()
    assert "] smollm2: loading, then reading the text" in lines[0]
    assert [ln.split("] ", 1)[1].split(",")[0] for ln in lines[2:]] == [
        "raw (1/3)", "cachegen (2/3)", "kivi-2 (3/3)"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = md.read_text()
    assert "| raw | 16.00 | 1.00x" in table or "| raw | 16.0" in table
    assert "100.0%" in table and "torch" in table

    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    r = CliRunner().invoke(app, ["bench", "--text", str(short)])
    assert r.exit_code == 1 and "tokens" in r.output and "Traceback" not in r.output


@pytest.mark.model
def test_fidelity_of_exact_and_lossy_kv(lm):
    from kvctl.common import bench as b

    work = b.text_workload(None, prefix=64, continuation=32, chunk_size=32, lm=lm)
    rep = b.run_bench(work, ["raw", "kivi-2"], repeats=1, chunk_size=32)
    raw, kivi = rep.results
    assert raw.top1 == 1.0 and abs(raw.ppl_change) < 1e-6
    assert kivi.rel_error > 0.05 and kivi.top1 is not None and kivi.top1 <= 1.0


# ------------------------------------------------------------------ Gemma 3 ----
@pytest.fixture(scope="module")
def gemma():
    from kvctl.common.model import load_model, load_tokenizer_for

    return load_model("gemma3"), load_tokenizer_for("gemma3")


@pytest.mark.model
def test_gemma3_kv_shape_and_greedy_decode_through_exact_kv(gemma):
    from kvctl.common.model import cache_from_kv, kv_from_cache, prefill

    lm, tok = gemma
    ids = list(tok("The lighthouse keeper wrote in his log that the storm")["input_ids"])
    assert ids[0] == tok.bos_token_id
    _, kv = prefill(lm, ids)
    # 18 layers (sliding-window and global alike keep every token), 1 KV head of 256
    assert list(kv.shape) == [18, 2, len(ids), 1, 256]
    assert (lm.num_layers, lm.num_kv_heads, lm.head_dim) == (18, 1, 256)

    n_new = 6
    with torch.inference_mode():
        own = lm.model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                min_new_tokens=n_new)[0, len(ids):].tolist()
    # the same tokens, each step reading the KV exported to kvctl's layout and rebuilt
    out: list[int] = []
    logits, kv = prefill(lm, ids)
    for _ in range(n_new):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        logits, kv = prefill(lm, [nxt], past_kv=kv.clone())
    assert out == own
    # and the exported layout is exactly what transformers held
    cache = cache_from_kv(kv)
    assert torch.equal(kv_from_cache(cache), kv)


def test_gemma3_gguf_is_assembled_once_and_repaired(tmp_path, monkeypatch):
    from kvctl.common import model as m

    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    path = m.gemma3_gguf_path()
    assert path.parent == tmp_path / "models" and path.read_bytes()[:4] == b"GGUF"
    size = path.stat().st_size
    mtime = path.stat().st_mtime_ns
    assert m.gemma3_gguf_path() == path and path.stat().st_mtime_ns == mtime  # not rewritten
    with path.open("r+b") as f:  # a file cut short (a crash, a full disk) is joined again
        f.truncate(size // 2)
    assert m.gemma3_gguf_path().stat().st_size == size
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over


# ------------------------------------------------------------------ the suite ----
def test_suite_has_ten_kinds_and_no_calibration_text():
    from kvctl.common import bench as b

    assert len(b.SUITE) >= 10
    assert {"prose", "python", "markdown", "json", "csv", "licence", "faq", "changelog",
            "german", "russian", "chat"} <= set(b.SUITE)
    assert all(p.is_file() for p in b.SUITE.values())
    assert b.TEXTS / "calibration.txt" not in b.SUITE.values()
    from kvctl.common import calibration

    assert not set(calibration.TEXTS) & set(b.SUITE.values())  # profiles never see the suite
    assert b.suite_kinds() == list(b.SUITE)
    assert b.suite_kinds(3) == list(b.SUITE)[:3]
    assert b.suite_kinds(kinds=["german", "prose"]) == ["prose", "german"]  # report order
    with pytest.raises(b.BenchError, match="unknown text kind 'klingon'"):
        b.suite_kinds(kinds=["klingon"])


@pytest.mark.model
def test_every_suite_text_is_long_enough_on_both_tokenizers(smollm2_tokenizer, gemma):
    from kvctl.common import bench as b

    _, gemma_tok = gemma
    for kind, path in b.SUITE.items():
        text = path.read_text(encoding="utf-8")
        for name, tok in (("smollm2", smollm2_tokenizer), ("gemma3", gemma_tok)):
            n = len(tok(text)["input_ids"])
            assert n >= 512 + 256 + 100, f"{kind} has only {n} tokens on {name}"


def test_suite_option_errors_are_one_line(app):
    cases = [(["--suite", "--text", "x.txt"], 2, "--suite runs the bundled texts"),
             (["--texts", "2"], 2, "add --suite"),
             (["--kind", "german"], 2, "add --suite"),
             (["--model", "smollm2", "--model", "gemma3"], 2, "one --model at a time"),
             (["--suite", "--texts", "0"], 2, "--texts"),
             (["--suite", "--kind", "klingon"], 1, "unknown text kind 'klingon'")]
    for args, code, msg in cases:
        r = CliRunner().invoke(app, ["bench", *args])
        assert r.exit_code == code and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output


@pytest.mark.model
def test_suite_end_to_end_reports_both_models(app, tmp_path):
    png, md = tmp_path / "s.png", tmp_path / "s.md"
    r = CliRunner().invoke(app, ["bench", "--suite", "--texts", "2", "--codec", "int8",
                                 "--prefix", "32", "--continuation", "16", "--chunk-size", "16",
                                 "--json", "--plot", str(png), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["texts"] == ["prose", "python"]
    assert [(m["model"], m["kv_shape"]) for m in rep["models"]] == [
        ("smollm2", [30, 2, 32, 3, 64]), ("gemma3", [18, 2, 32, 1, 256])]
    assert [(row["model"], row["method"]) for row in rep["rows"]] == [
        ("smollm2", "int8"), ("gemma3", "int8")]
    from kvctl.common.calibration import codec_key

    # each bundled model's committed cachegen profile was found (none was measured)
    assert [m["profile"] for m in rep["models"]] == [codec_key()] * 2
    for row in rep["rows"]:
        per_text = {t["kind"]: t for t in row["texts"]}
        assert list(per_text) == ["prose", "python"]
        top1 = [t["top1"] for t in per_text.values()]
        assert row["top1_worst"] == min(top1) and per_text[row["top1_worst_text"]]["top1"] == min(
            top1)
        assert row["top1_mean"] == pytest.approx(sum(top1) / 2)
        assert 0.5 < row["top1_worst"] <= 1.0 and 1.9 < row["ratio"] < 2.0
    # progress on stderr: each model, each text
    for line in ("smollm2: loading", "smollm2: python (2/2)", "gemma3: prose (1/2)"):
        assert line in r.stderr
    table = md.read_text()
    assert "## SmolLM2-135M-Instruct" in table and "## gemma-3-270m" in table
    assert table.count("| int8 | 8.") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_gemma3_engine_serves_a_prompt_longer_than_its_window_from_cached_kv(gemma):
    """A prompt past Gemma 3's 512-token sliding window: stored KV has every token on every
    layer, and the second request, read through it, continues exactly as the model does."""
    import anyio

    from kvctl.common import bench as b
    from kvctl.server.config import ServerSettings
    from kvctl.server.engine.core import CompletionRequest, Engine
    from kvctl.server.http.app import create_app

    lm, tok = gemma
    prompt = b.SUITE["faq"].read_text(encoding="utf-8")[:3000]
    ids = list(tok(prompt)["input_ids"])
    assert len(ids) > 600
    with torch.inference_mode():
        own = lm.model.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4,
                                do_sample=False)[0, len(ids):].tolist()

    async def run() -> tuple:
        controller = create_app(ServerSettings(model="none"))
        async with controller.router.lifespan_context(controller):
            engine = Engine(lm, tok, controller.state.runtime, [lm.name])
            req = CompletionRequest(prompt=prompt, max_tokens=4, temperature=0)
            first = await anyio.to_thread.run_sync(engine.generate, req)
            second = await anyio.to_thread.run_sync(engine.generate, req)
            return first, second

    first, second = anyio.run(run)
    assert first.cached_tokens == 0 and second.cached_tokens > 512
    assert first.text == second.text == tok.decode(own, skip_special_tokens=True)
