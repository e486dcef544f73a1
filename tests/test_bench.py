"""`kvctl bench`: the table, JSON, plot and markdown outputs, and its one-line errors."""

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
