"""`kvctl bench`: the table, JSON, plot and markdown outputs, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from kvctl.commands.bench import bench


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    a.command()(bench)

    @a.command()
    def _other() -> None:  # a second command keeps `bench` a subcommand, as in the real CLI
        pass

    return a


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


@pytest.mark.model
def test_gemma3_bench_on_text(app):
    r = CliRunner().invoke(app, ["bench", "--model", "gemma3", "--prefix", "64",
                                 "--continuation", "32", "--chunk-size", "32", "--repeats", "1",
                                 "--codec", "raw", "--codec", "int8", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["shape"] == [18, 2, 64, 1, 256]
    raw, int8 = rep["results"]
    assert raw["top1"] == 1.0 and abs(raw["ppl_change"]) < 1e-6
    assert int8["ratio"] > 1.9 and int8["top1"] > 0.8
