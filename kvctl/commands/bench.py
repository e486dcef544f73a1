"""`kvctl bench`: every codec on real KV, with size, speed and fidelity side by side."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from kvctl.common.defaults import DEFAULT_MODEL, debug
from kvctl.errors import EXIT_USAGE, KvctlError, UsageError
from kvctl.output import Output
from kvctl.state import state

if TYPE_CHECKING:
    from rich.console import Group

    from kvctl.common.bench import BenchReport, SuiteReport


def _fail(msg: str, code: int) -> NoReturn:
    # the root command prints it, as for every other command (kvctl/cli.py)
    raise UsageError(msg) if code == EXIT_USAGE else KvctlError(msg, code)


def bench(
    ctx: typer.Context,
    text: Annotated[Path | None, typer.Option(
        "--text", dir_okay=False,
        help="Held-out prose the embedded model reads (default: the bundled held-out text).")
    ] = None,
    kv: Annotated[Path | None, typer.Option(
        "--kv", dir_okay=False,
        help="A saved KV (safetensors; one tensor of layers x 2 x tokens x kv_heads x "
             "head_dim) instead of --text: size, speed and error only, no model fidelity.")] = None,
    suite: Annotated[bool, typer.Option(
        "--suite", help="Run every bundled kind of text (prose, code, markdown, JSON, CSV, "
                        "licence, FAQ, changelog, German, Russian, chat) on every embedded "
                        "model, and report each codec's mean and worst text.")] = False,
    model: Annotated[list[str] | None, typer.Option(
        "--model", metavar="MODEL", show_default=False,
        help="Model whose KV is benchmarked: smollm2 or gemma3 (embedded), a local directory "
             "or .gguf file. Repeatable with --suite. \\[default: smollm2; with --suite, "
             "both embedded models]")] = None,
    texts: Annotated[int | None, typer.Option(
        "--texts", min=1, metavar="N", show_default=False,
        help="With --suite: only the first N kinds of text (quicker). \\[default: all]")
    ] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", metavar="KIND", show_default=False,
        help="With --suite: only this kind of text (repeatable), e.g. german.")] = None,
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", metavar="METHOD", show_default=False,
        help="Method to run (repeatable), e.g. cachegen, cachegen-compact, raw, int8, kivi-2, "
             "kivi-4, fp8. \\[default: all of them]")] = None,
    prefix: Annotated[int, typer.Option(help="Prefix tokens whose KV is compressed.")] = 512,
    continuation: Annotated[int, typer.Option(
        help="Tokens the model then reads through the decoded KV.")] = 256,
    chunk_size: Annotated[int, typer.Option(help="Tokens per encoded chunk.")] = 256,
    repeats: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help="Timed runs per chunk (median). \\[default: 3; 1 with --suite, whose speed is "
             "the median over its texts]")] = None,
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
    if suite and (text is not None or kv is not None):
        _fail("--suite runs the bundled texts; drop --text/--kv, or drop --suite", 2)
    if not suite and (texts is not None or kind):
        _fail("--texts and --kind choose the suite's texts; add --suite", 2)
    if not suite and model and len(model) > 1:
        _fail("one --model at a time without --suite", 2)
    repeats = repeats if repeats is not None else (1 if suite else 3)
    if chunk_size < 1 or repeats < 1:
        _fail("--chunk-size and --repeats must be >= 1", 2)
    from kvctl.codecs import CodecError, available_methods, codec_for_method

    methods = list(codec or available_methods())
    for m in methods:
        try:
            codec_for_method(m)
        except CodecError as exc:
            _fail(str(exc), 2)
    cmd = "kvctl " + " ".join(sys.argv[1:]) if sys.argv[1:] else "kvctl bench"
    out = Output(json=as_json or state(ctx).out.json)
    say = _progress(out)
    try:
        from kvctl.common import bench as b
        from kvctl.common.model import BUILTIN_MODELS, ModelNotFoundError

        if suite:
            kinds = b.suite_kinds(texts, kind)
            models = list(dict.fromkeys(model or BUILTIN_MODELS))
            report: Any = b.run_suite(models, methods, kinds, prefix, continuation, chunk_size,
                                      repeats, progress=say)
            if plot is not None:
                b.suite_plot(report, plot)
            if markdown is not None:
                _write(markdown, b.suite_markdown(report, cmd))
        else:
            if kv is not None:
                work = b.kv_file_workload(kv, chunk_size)
            else:
                name = (model or [DEFAULT_MODEL])[0]
                say(f"{name}: loading, then reading the text (exact KV and reference logits)")
                work = b.text_workload(text, prefix, continuation, chunk_size, model=name)
            say(f"{len(methods)} codecs, {repeats} timed run(s) each")
            report = b.run_bench(work, methods, repeats, chunk_size, progress=say)
            if plot is not None:
                b.plot(report, plot)
            if markdown is not None:
                _write(markdown, b.markdown(report, cmd))
    except (b.BenchError, ModelNotFoundError, CodecError, OSError) as exc:
        if debug():
            raise
        _fail(str(exc), 1)
    import json

    out.result(json.loads(report.to_json()), lambda: _suite_tables(report) if suite
               else _single_table(report))


def _write(path: Path, content: str) -> None:
    from kvctl.common.paths import atomic_write

    atomic_write(path, content.encode("utf-8"), durable=False)


def _progress(out: Output) -> Any:
    """One stderr line per step (model load, text, codec), with the time since the start."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        out.note(f"[{time.perf_counter() - t0:6.0f} s] {msg}")

    return say


def _single_table(report: BenchReport) -> Group:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from kvctl.common import bench as b

    # a light box and unwrapped cells: the eight columns fit an 80-column terminal
    table = Table(title=f"KV codecs on {Path(report.source).name}: {report.shape} "
                        f"in {report.chunk_size}-token chunks", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True,
                  caption="enc/dec: MB of fp16 KV per second on one thread")
    for i, h in enumerate(b.SHORT_HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in b.table_rows(report):
        table.add_row(*row)
    parts: list[Any] = [table]
    if report.reference_ppl is not None:
        parts.append(Text(f"fidelity: next {report.continuation} tokens read through the "
                          f"decoded {report.prefix}-token prefix vs the exact fp16 KV "
                          f"(reference perplexity {report.reference_ppl:.3f}); throughput on "
                          "one thread"))
    return Group(*parts)


def _suite_tables(report: SuiteReport) -> Group:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from kvctl.common import bench as b

    parts: list[Any] = []
    for mod in report.models:
        table = Table(title=f"{mod.name}: {len(report.texts)} texts, KV {mod.kv_shape}",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for i, h in enumerate(b.SUITE_SHORT_HEADERS):
            table.add_column(h, justify="left" if i in (0, 6) else "right", no_wrap=True)
        for row in b.suite_table_rows(report, mod.model):
            table.add_row(row[0], *row[2:-1])
        parts.append(table)
    parts.append(Text(f"texts: {', '.join(report.texts)}. top-1, ppl Δ: mean over texts; "
                      f"worst: the worst text's top-1. Next {report.continuation} tokens read "
                      f"through the decoded {report.prefix}-token prefix vs the exact fp16 "
                      f"KV; enc/dec: MB/s on one thread, median over texts. "
                      f"{report.seconds / 60:.1f} min."))
    return Group(*parts)
