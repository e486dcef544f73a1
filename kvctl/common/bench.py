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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvctl.common.model import LoadedModel

TEXTS = Path(__file__).resolve().parent / "texts"
DEFAULT_TEXT = TEXTS / "heldout.txt"


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


def machine_info() -> dict[str, str]:
    import os

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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


def split_chunks(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    return [kv[:, :, i:i + chunk_size].contiguous() for i in range(0, kv.shape[2], chunk_size)]


def text_workload(text_path: Path | None, prefix: int = 512, continuation: int = 256,
                  chunk_size: int = 256, lm: LoadedModel | None = None,
                  tokenizer: Any = None, model: str = "smollm2") -> Workload:
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
    return Workload(source=str(path), chunks=split_chunks(kv16, chunk_size), prefix=prefix,
                    continuation=continuation, continuation_ids=ids[prefix:],
                    ref_logits=logits.float(), lm=lm)


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
        # a warm-up round so compilation and allocation stay out of the timings
        blobs = [codec.encode(c) for c in work.chunks]
        [decode_blob(b) for b in blobs]
        enc_t = dec_t = 0.0
        decoded = []
        for chunk in work.chunks:
            t, blob = _timed(lambda c=chunk: codec.encode(c), repeats)
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
        ref_ppl, _ = ppl_and_top1(work.ref_logits, work.ref_logits, work.continuation_ids)
        res.top1 = top1
        res.ppl_change = ppl / ref_ppl - 1.0
    return res


def default_methods() -> list[str]:
    from kvctl.codecs import available_methods

    return available_methods()


def run_bench(work: Workload, methods: list[str] | None = None, repeats: int = 3,
              chunk_size: int = 256) -> BenchReport:
    from kvctl.codecs import codec_for_method

    ref_ppl = None
    if work.ref_logits is not None and work.continuation_ids:
        ref_ppl, _ = ppl_and_top1(work.ref_logits, work.ref_logits, work.continuation_ids)
    shape = list(work.chunks[0].shape)
    shape[2] = sum(c.shape[2] for c in work.chunks)
    report = BenchReport(source=work.source, shape=shape, chunk_size=chunk_size,
                         prefix=work.prefix, continuation=work.continuation,
                         reference_ppl=ref_ppl, machine=machine_info())
    for m in methods or default_methods():
        report.results.append(evaluate(m, codec_for_method(m), work, repeats))
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
