"""`kvctl bench`: every codec on real KV, with size, speed and fidelity side by side."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from kvctl.errors import EXIT_USAGE, KvctlError, UsageError


def _fail(msg: str, code: int) -> NoReturn:
    # the root command prints it, as for every other command (kvctl/cli.py)
    raise UsageError(msg) if code == EXIT_USAGE else KvctlError(msg, code)


def bench(
    text: Annotated[Path | None, typer.Option(
        "--text", dir_okay=False,
        help="Held-out prose the embedded model reads (default: the bundled held-out text).")
    ] = None,
    kv: Annotated[Path | None, typer.Option(
        "--kv", dir_okay=False,
        help="A saved KV (safetensors; one tensor of layers x 2 x tokens x kv_heads x "
             "head_dim) instead of --text: size, speed and error only, no model fidelity.")] = None,
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", help="Method to run (repeatable), e.g. cachegen, cachegen-compact, raw, "
                        "int8, kivi-2, kivi-4, fp8 (default: all of them).")] = None,
    prefix: Annotated[int, typer.Option(help="Prefix tokens whose KV is compressed.")] = 512,
    continuation: Annotated[int, typer.Option(
        help="Tokens the model then reads through the decoded KV.")] = 256,
    chunk_size: Annotated[int, typer.Option(help="Tokens per encoded chunk.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed runs per chunk (median).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                       ] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", dir_okay=False, help="Write a ratio-vs-fidelity PNG here.")] = None,
    markdown: Annotated[Path | None, typer.Option(
        "--markdown", dir_okay=False, help="Write the results as a markdown table here.")
    ] = None,
) -> None:
    """Benchmark the KV codecs on real KV: size, speed, error, top-1 agreement, perplexity."""
    if text is not None and kv is not None:
        _fail("--text and --kv are alternatives; give one", 2)
    if chunk_size < 1 or repeats < 1:
        _fail("--chunk-size and --repeats must be >= 1", 2)
    from kvctl.codecs import CodecError, available_methods, codec_for_method

    methods = list(codec or available_methods())
    for m in methods:
        try:
            codec_for_method(m)
        except CodecError as exc:
            _fail(str(exc), 2)
    try:
        from kvctl.common import bench as b
        from kvctl.common.model import ModelNotFoundError

        if kv is not None:
            work = b.kv_file_workload(kv, chunk_size)
        else:
            work = b.text_workload(text, prefix, continuation, chunk_size)
        report = b.run_bench(work, methods, repeats, chunk_size)
        if plot is not None:
            b.plot(report, plot)
        if markdown is not None:
            cmd = "kvctl " + " ".join(sys.argv[1:]) if sys.argv[1:] else "kvctl bench"
            markdown.write_text(b.markdown(report, cmd), encoding="utf-8")
    except (b.BenchError, ModelNotFoundError, CodecError, OSError) as exc:
        if os.environ.get("KVCTL_DEBUG") == "1":
            raise
        _fail(str(exc), 1)
    if as_json:
        typer.echo(report.to_json())
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # a light box and unwrapped cells: the eight columns fit an 80-column terminal
    table = Table(title=f"KV codecs on {Path(report.source).name}: {report.shape} "
                        f"in {report.chunk_size}-token chunks", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True,
                  caption="enc/dec: MB of fp16 KV per second on one thread")
    for i, h in enumerate(b.SHORT_HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in b.table_rows(report):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if report.reference_ppl is not None:
        console.print(f"fidelity: next {report.continuation} tokens read through the decoded "
                      f"{report.prefix}-token prefix vs the exact fp16 KV (reference "
                      f"perplexity {report.reference_ppl:.3f}); throughput on one thread")
