"""The codec benchmark: every codec on real KV, for size, speed and what the model notices.

Protocol (the issue's): the embedded model reads ``prefix + continuation`` tokens of a text.
The prefix KV (fp16, as a serving cache holds it) is cut into ``chunk_size``-token chunks,
each chunk encoded and decoded on its own, every byte of every blob counted. The model then
reads the continuation through the decoded prefix KV, and its logits are compared with those
it produces through the exact fp16 prefix KV: top-1 next-token agreement, and the perplexity
of the true continuation tokens. Throughput is fp16 bytes per second of wall time on one
thread (median of ``repeats`` runs).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.common.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

    from kvctl.common.model import LoadedModel

TEXTS = Path(__file__).resolve().parent / "texts"
DEFAULT_TEXT = TEXTS / "heldout.txt"
SUITE_DIR = TEXTS / "suite"
# The suite's kinds of text, in report order. Prose is the single-text benchmark's held-out
# text; the others were written for the suite. Each holds >= 900 tokens on both bundled
# tokenizers (the protocol reads 768).
SUITE: dict[str, Path] = {
    "prose": DEFAULT_TEXT,
    **{kind: SUITE_DIR / f"{kind}.txt" for kind in (
        "python", "markdown", "json", "csv", "licence", "faq", "changelog", "german",
        "russian", "chat")},
}


class BenchError(Exception):
    """Bad benchmark input (a missing file, a text too short, an unreadable KV file)."""


@dataclass
class CodecResult:
    method: str
    codec: str
    params: dict[str, Any]
    bits_per_element: float
    ratio: float
    encode_mbps: float
    decode_mbps: float
    rel_error: float
    top1: float | None = None
    ppl_change: float | None = None
    blob_bytes: int = 0


@dataclass
class BenchReport:
    source: str
    shape: list[int]
    chunk_size: int
    prefix: int
    continuation: int
    reference_ppl: float | None
    results: list[CodecResult] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    import os

    import torch
    import transformers

    cpu = cpu_name()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "arch": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": __import__("numpy").__version__,
            "numba": __import__("numba").__version__, "threads": "1 (torch.set_num_threads)"}


@dataclass
class Workload:
    """Prefix KV chunks plus, when a model is involved, what fidelity needs."""

    source: str
    chunks: list[torch.Tensor]
    prefix: int
    continuation: int
    continuation_ids: list[int] | None = None
    ref_logits: torch.Tensor | None = None
    lm: LoadedModel | None = None
    ref_ppl: float | None = None
    tokenizer: Any = None


def split_chunks(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    return [kv[:, :, i:i + chunk_size].contiguous() for i in range(0, kv.shape[2], chunk_size)]


def text_workload(text_path: Path | None, prefix: int = 512, continuation: int = 256,
                  chunk_size: int = 256, lm: LoadedModel | None = None,
                  tokenizer: Any = None, model: str = DEFAULT_MODEL) -> Workload:
    """Tokenize a text, build the exact fp16 prefix KV and the reference logits.

    ``model`` names the model loaded when ``lm``/``tokenizer`` are not given.
    """
    import torch

    from kvctl.common.model import load_model, load_tokenizer_for, prefill

    path = Path(text_path) if text_path else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BenchError(f"{path} is not UTF-8 text") from None
    if prefix < 1 or continuation < 2:
        raise BenchError("--prefix must be >= 1 and --continuation >= 2")
    lm = lm or load_model(model)
    tokenizer = tokenizer or load_tokenizer_for(model)
    ids = list(tokenizer(text)["input_ids"])
    need = prefix + continuation
    if len(ids) < need:
        raise BenchError(f"{path} has {len(ids)} tokens; --prefix {prefix} + --continuation "
                         f"{continuation} need {need}")
    ids = ids[:need]
    if need > lm.max_model_len:
        raise BenchError(f"prefix + continuation = {need} exceeds the model's context "
                         f"({lm.max_model_len})")
    _, kv = prefill(lm, ids[:prefix], logits_to_keep=1)
    kv16 = kv.to(torch.float16)
    logits, _ = prefill(lm, ids[prefix:], past_kv=kv16.float())
    ref_ppl, _ = ppl_and_top1(logits, logits, ids[prefix:])
    return Workload(source=str(path), chunks=split_chunks(kv16, chunk_size), prefix=prefix,
                    continuation=continuation, continuation_ids=ids[prefix:],
                    ref_logits=logits.float(), lm=lm, ref_ppl=ref_ppl, tokenizer=tokenizer)


def kv_file_workload(path: Path, chunk_size: int = 256) -> Workload:
    """A saved KV (safetensors, one 5-D tensor, ``kv`` preferred): size and speed only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise BenchError(f"cannot read KV file {path}: {exc}") from None
    if not tensors:
        raise BenchError(f"{path} holds no tensors")
    kv = tensors.get("kv", next(iter(tensors.values())))
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise BenchError(f"{path}: expected a [layers, 2, tokens, kv_heads, head_dim] tensor, "
                         f"got {list(kv.shape)}")
    return Workload(source=str(path), chunks=split_chunks(kv, chunk_size),
                    prefix=kv.shape[2], continuation=0)


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def ppl_and_top1(logits: torch.Tensor, ref_logits: torch.Tensor, ids: list[int]
                 ) -> tuple[float, float]:
    """(perplexity of the true continuation, top-1 agreement with the reference logits).

    Logit i predicts continuation token i+1; the first continuation token is predicted by
    the prefix's last logit, which does not read the cache, so it is left out of both.
    """
    import torch

    target = torch.tensor(ids[1:], dtype=torch.long)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -lp.gather(1, target.unsqueeze(1)).mean()
    agree = (logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).float().mean()
    return math.exp(float(nll)), float(agree)


def evaluate(method: str, codec: Any, work: Workload, repeats: int = 3) -> CodecResult:
    import torch

    from kvctl.codecs import decode_blob

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # each chunk's sequence position (the prefix's chunks are consecutive), which
        # a codec that undoes the rotary embedding reads, as a server passes it
        starts = [sum(c.shape[2] for c in work.chunks[:i]) for i in range(len(work.chunks))]
        # a warm-up round so compilation and allocation stay out of the timings
        blobs = [codec.encode(c, position=p) for c, p in zip(work.chunks, starts, strict=True)]
        [decode_blob(b) for b in blobs]
        enc_t = dec_t = 0.0
        decoded = []
        for chunk, start in zip(work.chunks, starts, strict=True):
            t, blob = _timed(lambda c=chunk, p=start: codec.encode(c, position=p), repeats)
            enc_t += t
            t, out = _timed(lambda b=blob: decode_blob(b), repeats)
            dec_t += t
            decoded.append(out)
    finally:
        torch.set_num_threads(prev_threads)
    n_elem = sum(c.numel() for c in work.chunks)
    fp16_bytes = 2 * n_elem
    blob_bytes = sum(len(b) for b in blobs)
    x = torch.cat([c.float() for c in work.chunks], dim=2)
    y = torch.cat([d.float() for d in decoded], dim=2)
    rel = float((y - x).norm() / x.norm().clamp_min(1e-30))
    res = CodecResult(method=method, codec=codec.name, params=dict(codec.params),
                      bits_per_element=8 * blob_bytes / n_elem, ratio=fp16_bytes / blob_bytes,
                      encode_mbps=fp16_bytes / enc_t / 1e6, decode_mbps=fp16_bytes / dec_t / 1e6,
                      rel_error=rel, blob_bytes=blob_bytes)
    if work.lm is not None and work.ref_logits is not None and work.continuation_ids:
        from kvctl.common.model import prefill

        logits, _ = prefill(work.lm, work.continuation_ids, past_kv=y)
        ppl, top1 = ppl_and_top1(logits, work.ref_logits, work.continuation_ids)
        ref_ppl = work.ref_ppl
        if ref_ppl is None:
            ref_ppl, _ = ppl_and_top1(work.ref_logits, work.ref_logits, work.continuation_ids)
        res.top1 = top1
        res.ppl_change = ppl / ref_ppl - 1.0
    return res


def default_methods() -> list[str]:
    from kvctl.codecs import available_methods

    return available_methods()


def run_bench(work: Workload, methods: list[str] | None = None, repeats: int = 3,
              chunk_size: int = 256, progress: Callable[[str], None] | None = None
              ) -> BenchReport:
    """Every method on one workload; with a model, cachegen uses that model's step profile
    (kvctl.common.calibration), as a worker running the model would. ``progress`` gets
    one line per method."""
    from kvctl.common.calibration import codec_for, load_profile, profile_for

    profile = None
    if work.lm is not None:
        profile = (profile_for(work.lm, work.tokenizer) if work.tokenizer is not None
                   else load_profile(work.lm.name))
    ref_ppl = work.ref_ppl
    if ref_ppl is None and work.ref_logits is not None and work.continuation_ids:
        ref_ppl, _ = ppl_and_top1(work.ref_logits, work.ref_logits, work.continuation_ids)
    shape = list(work.chunks[0].shape)
    shape[2] = sum(c.shape[2] for c in work.chunks)
    report = BenchReport(source=work.source, shape=shape, chunk_size=chunk_size,
                         prefix=work.prefix, continuation=work.continuation,
                         reference_ppl=ref_ppl, machine=machine_info())
    say = progress or (lambda _msg: None)
    methods = methods or default_methods()
    for i, m in enumerate(methods, 1):
        t0 = time.perf_counter()
        report.results.append(evaluate(m, codec_for(m, profile), work, repeats))
        say(f"{m} ({i}/{len(methods)}), {time.perf_counter() - t0:.1f} s")
    return report



# ------------------------------------------------------------------ rendering ----
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for r in report.results:
        rows.append([r.method, f"{r.bits_per_element:.2f}", f"{r.ratio:.2f}x",
                     f"{r.encode_mbps:.0f}", f"{r.decode_mbps:.0f}", f"{r.rel_error:.4f}",
                     _fmt(None if r.top1 is None else 100 * r.top1, ".1f") + (
                         "%" if r.top1 is not None else ""),
                     _fmt(None if r.ppl_change is None else 100 * r.ppl_change, "+.2f") + (
                         "%" if r.ppl_change is not None else "")])
    return rows


HEADERS = ["codec", "bits/elem", "ratio vs fp16", "encode MB/s", "decode MB/s",
           "rel. error", "top-1 agree", "ppl change"]
# the same columns, narrow enough for an 80-column terminal (enc/dec in MB/s)
SHORT_HEADERS = ["codec", "b/el", "ratio", "enc", "dec", "rel err", "top-1", "ppl Δ"]


def markdown(report: BenchReport, command: str = "kvctl bench") -> str:
    m = report.machine
    lines = [
        "# Codec benchmark", "",
        f"Command: `{command}`", "",
        f"- Source: `{Path(report.source).name}`, KV shape {report.shape} "
        f"(layers, K/V, tokens, kv heads, head dim), chunks of {report.chunk_size} tokens, "
        "each encoded on its own, every blob byte counted.",
        f"- Fidelity: the model reads the next {report.continuation} tokens through the "
        f"decoded {report.prefix}-token prefix KV, compared with the exact fp16 KV "
        f"(reference perplexity {_fmt(report.reference_ppl, '.3f')}).",
        f"- Machine: {m.get('cpu')} ({m.get('arch')}, {m.get('cores')} cores, GPU: "
        f"{m.get('gpu')}); Python {m.get('python')}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, numpy {m.get('numpy')}, numba {m.get('numba')}.",
        "- Throughput: MB of fp16 KV per second on one thread (torch.set_num_threads(1)), "
        "median of repeated runs; the machine is shared, so timings are noisy.", "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += ["", "Columns: bits per element and ratio count every byte of every blob (header, "
              "side information, checksum); relative error is ||decoded - KV|| / ||KV|| over "
              "the whole prefix; top-1 is the share of continuation positions whose argmax "
              "next token matches the exact-KV run; ppl change is the relative change in "
              "perplexity of the true continuation tokens."]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(report.results):
        y = 100 * r.top1 if r.top1 is not None else 100 * (1 - r.rel_error)
        ax.scatter(r.ratio, y, s=40)
        # alternate label sides so neighbours (int8/fp8) stay readable
        ax.annotate(r.method, (r.ratio, y), textcoords="offset points",
                    xytext=(5, 4) if i % 2 == 0 else (5, -11), fontsize=8)
    ax.set_xlabel("compression ratio vs fp16 (every blob byte counted)")
    has_top1 = any(r.top1 is not None for r in report.results)
    ax.set_ylabel("top-1 next-token agreement (%)" if has_top1 else "100 x (1 - rel. error)")
    ax.set_title(f"KV codecs on {Path(report.source).name} "
                 f"({report.prefix}-token prefix, {report.chunk_size}-token chunks)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- suite ----
@dataclass
class TextScore:
    """One codec on one text of the suite."""

    kind: str
    ratio: float
    rel_error: float
    top1: float
    ppl_change: float
    encode_mbps: float
    decode_mbps: float


@dataclass
class SuiteRow:
    """One codec on one model, over every text of the suite."""

    model: str
    method: str
    codec: str
    params: dict[str, Any]
    bits_per_element: float
    ratio: float  # all texts' fp16 bytes over all their blob bytes
    encode_mbps: float  # median over the texts
    decode_mbps: float
    rel_error_mean: float
    top1_mean: float
    top1_worst: float
    top1_worst_text: str
    ppl_change_mean: float
    ppl_change_max: float
    ppl_change_max_text: str
    texts: list[TextScore] = field(default_factory=list)


@dataclass
class SuiteModel:
    model: str  # the --model value
    name: str  # the name the model is served under
    kv_shape: list[int]  # layers, K/V, tokens, kv heads, head dim of one text's prefix
    # cachegen's step profile for the model (kvctl.common.calibration): its key, or "none"
    profile: str = "none"
    reference_ppl: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SuiteReport:
    texts: list[str]
    prefix: int
    continuation: int
    chunk_size: int
    repeats: int
    models: list[SuiteModel] = field(default_factory=list)
    rows: list[SuiteRow] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def rows_for(self, model: str) -> list[SuiteRow]:
        return [r for r in self.rows if r.model == model]


def suite_kinds(limit: int | None = None, kinds: list[str] | None = None) -> list[str]:
    """The suite's kinds in report order: the ``kinds`` named (checked), else the first
    ``limit`` (all by default)."""
    if kinds:
        unknown = [k for k in kinds if k not in SUITE]
        if unknown:
            raise BenchError(f"unknown text kind {unknown[0]!r}; the suite has "
                             f"{', '.join(SUITE)}")
        return [k for k in SUITE if k in kinds]
    if limit is not None and limit < 1:
        raise BenchError("--texts must be >= 1")
    return list(SUITE)[:limit]


def _summarize(model: str, method: str, codec: Any, results: list[CodecResult],
               kinds: list[str]) -> SuiteRow:
    scores = [TextScore(kind=k, ratio=r.ratio, rel_error=r.rel_error, top1=float(r.top1 or 0),
                        ppl_change=float(r.ppl_change or 0), encode_mbps=r.encode_mbps,
                        decode_mbps=r.decode_mbps) for k, r in zip(kinds, results, strict=True)]
    blob = sum(r.blob_bytes for r in results)
    fp16 = sum(r.blob_bytes * r.ratio for r in results)
    worst = min(scores, key=lambda t: t.top1)
    most = max(scores, key=lambda t: t.ppl_change)
    return SuiteRow(
        model=model, method=method, codec=codec.name, params=dict(codec.params),
        bits_per_element=16 * blob / fp16, ratio=fp16 / blob,
        encode_mbps=statistics.median(t.encode_mbps for t in scores),
        decode_mbps=statistics.median(t.decode_mbps for t in scores),
        rel_error_mean=statistics.fmean(t.rel_error for t in scores),
        top1_mean=statistics.fmean(t.top1 for t in scores), top1_worst=worst.top1,
        top1_worst_text=worst.kind,
        ppl_change_mean=statistics.fmean(t.ppl_change for t in scores),
        ppl_change_max=most.ppl_change, ppl_change_max_text=most.kind, texts=scores)


def run_suite(models: list[str], methods: list[str] | None = None,
              kinds: list[str] | None = None, prefix: int = 512, continuation: int = 256,
              chunk_size: int = 256, repeats: int = 1,
              progress: Callable[[str], None] | None = None) -> SuiteReport:
    """Every codec on every kind of text, for each model (loaded one at a time)."""
    import gc

    from kvctl.common.calibration import codec_for, load_profile, profile_for
    from kvctl.common.model import load_model, load_tokenizer_for

    methods = methods or default_methods()
    kinds = kinds or list(SUITE)
    say = progress or (lambda _msg: None)
    report = SuiteReport(texts=kinds, prefix=prefix, continuation=continuation,
                         chunk_size=chunk_size, repeats=repeats, machine=machine_info())
    t_all = time.perf_counter()
    for model in models:
        t_model = time.perf_counter()
        say(f"{model}: loading")
        lm = load_model(model)
        tokenizer = load_tokenizer_for(model)
        if load_profile(lm.name) is None:
            say(f"{model}: measuring its cachegen step profile (once; cached)")
        profile = profile_for(lm, tokenizer)  # committed for a bundled model, else measured
        entry = SuiteModel(model=model, name=lm.name, kv_shape=[],
                           profile=profile.key if profile else "none")
        report.models.append(entry)
        per_method: dict[str, list[CodecResult]] = {m: [] for m in methods}
        for i, kind in enumerate(kinds, 1):
            t_text = time.perf_counter()
            work = text_workload(SUITE[kind], prefix, continuation, chunk_size, lm=lm,
                                 tokenizer=tokenizer)
            if not entry.kv_shape:
                entry.kv_shape = [*work.chunks[0].shape]
                entry.kv_shape[2] = sum(c.shape[2] for c in work.chunks)
            entry.reference_ppl[kind] = float(work.ref_ppl or 0)
            for m in methods:
                per_method[m].append(evaluate(m, codec_for(m, profile), work, repeats))
            say(f"{model}: {kind} ({i}/{len(kinds)}), {len(methods)} codecs, "
                f"{time.perf_counter() - t_text:.1f} s")
            del work
        for m in methods:
            report.rows.append(_summarize(model, m, codec_for(m, profile), per_method[m],
                                          kinds))
        entry.seconds = time.perf_counter() - t_model
        del lm, tokenizer
        gc.collect()  # one model's weights at a time: Gemma 3's fp32 copy is ~1 GB
    report.seconds = time.perf_counter() - t_all
    return report


def _pct(v: float, spec: str = ".1f") -> str:
    return f"{100 * v:{spec}}%"


SUITE_HEADERS = ["codec", "bits/elem", "ratio vs fp16", "encode MB/s", "decode MB/s",
                 "top-1 mean", "top-1 worst", "worst text", "ppl change mean",
                 "ppl change max"]
# the terminal's columns (bits/elem and the largest ppl change are left out, so the table
# fits 80 columns; --markdown and --json have them)
SUITE_SHORT_HEADERS = ["codec", "ratio", "enc", "dec", "top-1", "worst", "text", "ppl Δ"]


def suite_table_rows(report: SuiteReport, model: str) -> list[list[str]]:
    return [[r.method, f"{r.bits_per_element:.2f}", f"{r.ratio:.2f}x", f"{r.encode_mbps:.0f}",
             f"{r.decode_mbps:.0f}", _pct(r.top1_mean), _pct(r.top1_worst), r.top1_worst_text,
             _pct(r.ppl_change_mean, "+.2f"), _pct(r.ppl_change_max, "+.2f")]
            for r in report.rows_for(model)]


def suite_markdown(report: SuiteReport, command: str = "kvctl bench --suite") -> str:
    m = report.machine
    lines = [
        "# Codec benchmark: the text suite", "",
        f"Command: `{command}`", "",
        f"- Texts ({len(report.texts)} kinds, bundled in `kvctl/common/texts/`): "
        + ", ".join(report.texts) + ". None of them is used for tuning or for cachegen's "
        "step profiles (those read `calibration.txt` and `calibration_mixed.txt`).",
        f"- Protocol, per text: the model reads {report.prefix + report.continuation} tokens; "
        f"the fp16 KV of the first {report.prefix} is cut into {report.chunk_size}-token "
        "chunks, each encoded and decoded on its own, every blob byte counted; the model then "
        f"reads the next {report.continuation} tokens through the decoded KV, compared with "
        "the exact fp16 KV.",
        f"- Machine: {m.get('cpu')} ({m.get('arch')}, {m.get('cores')} cores, GPU: "
        f"{m.get('gpu')}); Python {m.get('python')}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, numpy {m.get('numpy')}, numba {m.get('numba')}.",
        f"- Throughput: MB of fp16 KV per second on one thread, median over the texts "
        f"({report.repeats} timed run(s) per chunk after a warm-up); the machine is shared, so "
        f"timings are noisy. The whole suite took {report.seconds / 60:.1f} min.", ""]
    for mod in report.models:
        rows = report.rows_for(mod.model)
        lines += [f"## {mod.name} (`--model {mod.model}`)", "",
                  f"KV of one text's prefix: {mod.kv_shape} (layers, K/V, tokens, kv heads, "
                  f"head dim); reference perplexity per text: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in mod.reference_ppl.items()) + "; "
                  + (f"cachegen step profile `{mod.profile}` (kvctl.common.calibration)."
                     if mod.profile != "none" else "cachegen with equal steps (no profile)."),
                  "",
                  "| " + " | ".join(SUITE_HEADERS) + " |", "|" + "---|" * len(SUITE_HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in suite_table_rows(report, mod.model)]
        lines += ["", "Top-1 agreement by text:", "",
                  "| codec | " + " | ".join(report.texts) + " |",
                  "|" + "---|" * (len(report.texts) + 1)]
        lines += [f"| {r.method} | " + " | ".join(f"{100 * t.top1:.1f}" for t in r.texts)
                  + " |" for r in rows]
        lines += ["", "Perplexity change by text (%):", "",
                  "| codec | " + " | ".join(report.texts) + " |",
                  "|" + "---|" * (len(report.texts) + 1)]
        lines += [f"| {r.method} | " + " | ".join(f"{100 * t.ppl_change:+.2f}" for t in r.texts)
                  + " |" for r in rows]
        lines.append("")
    lines += ["Columns: bits per element and ratio count every byte of every blob over all "
              "texts; top-1 is the share of continuation positions whose argmax next token "
              "matches the exact-KV run (mean over texts, and the worst text); ppl change is "
              "the relative change in perplexity of the true continuation tokens (mean over "
              "texts, and the largest)."]
    return "\n".join(lines) + "\n"


def suite_plot(report: SuiteReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(report.models))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.8), sharey=True, squeeze=False)
    for ax, mod in zip(axes[0], report.models, strict=False):
        for r in report.rows_for(mod.model):
            y, low = 100 * r.top1_mean, 100 * r.top1_worst
            # the bar reaches down to the worst text: a mean can hide one broken text.
            # A legend, not labels by the dots: int8 and fp8 sit on top of each other.
            ax.errorbar(r.ratio, y, yerr=[[y - low], [0]], fmt="o", capsize=3, ms=5,
                        label=f"{r.method} ({r.ratio:.1f}x, {y:.1f}%)")
        ax.legend(fontsize=8, loc="lower left")
        ax.set_title(f"{mod.name}: {len(report.texts)} texts", fontsize=10)
        ax.set_xlabel("compression ratio vs fp16 (every blob byte counted)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 agreement, mean (dot) and worst text (bar) (%)")
    fig.suptitle(f"KV codecs on the text suite ({report.prefix}-token prefix in "
                 f"{report.chunk_size}-token chunks, next {report.continuation} tokens)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
