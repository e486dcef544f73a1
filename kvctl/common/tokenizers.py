"""Tokenizer resolution: hub ids (local cache only), local files, GGUF files and built-ins.

The server's engine may use this module too, so it imports nothing from the CLI and
raises `TokenizerError` (a ValueError) rather than CLI errors. transformers loads lazily:
importing this module must stay cheap for `kvctl --help`.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from kvctl.common.paths import atomic_write, cache_root, file_tag

BUILTIN_TOKENIZERS = ("smollm2", "llama3")
DEFAULT_TOKENIZER = "smollm2"  # the model `kvctl serve` runs

LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"
LLAMA3_NUM_SPECIAL = 256
# Llama 3's named special tokens, in id order from 128000 (llama_models/llama3/tokenizer.py);
# the rest of the 256 are reserved ones.
_LLAMA3_NAMED = (
    LLAMA3_BOS, LLAMA3_EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be resolved on this machine; the message says why."""


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3, in id order."""
    reserved = [f"<|reserved_special_token_{2 + i}|>"
                for i in range(LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED))]
    return [*_LLAMA3_NAMED, *reserved]


def llama3_model_file() -> Path:
    """`tokenizer.model` of the `llama-models` package, found without importing it
    (its ``__init__`` pulls in dependencies we do not install)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the llama3 tokenizer needs the `llama-models` package: "
                             "pip install --no-deps llama-models (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; reinstall with "
                             "`pip install --no-deps --force-reinstall llama-models`")
    return path


def _build_llama3(model_file: Path) -> Any:
    """A `tokenizers.Tokenizer` equivalent to Llama 3's tiktoken one, BOS prepended."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama3_special_tokens()
    tok = TikTokenConverter(vocab_file=str(model_file),
                            extra_special_tokens=specials).converted()
    bos_id = tok.token_to_id(LLAMA3_BOS)
    if bos_id != 128000:
        raise TokenizerError(f"{model_file}: expected {LLAMA3_BOS} at id 128000, got {bos_id}")
    # vLLM's /tokenize adds special tokens: for Llama 3 that is BOS in front.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B:1",
            special_tokens=[(LLAMA3_BOS, bos_id)]),
    ])
    return tok


def load_llama3() -> Any:
    """Llama 3's tokenizer from `llama-models`, converted once and cached as tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    model_file = llama3_model_file()
    cached = cache_root() / "tokenizers" / f"llama3-{file_tag(model_file)}" / "tokenizer.json"
    if cached.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(cached))
    else:
        tok = _build_llama3(model_file)
        try:
            atomic_write(cached, tok.to_str().encode(), durable=False)
        except OSError:
            pass  # a read-only cache only costs the conversion time next run
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_BOS,
                                   eos_token=LLAMA3_EOS, model_max_length=131072)


def _load_gguf(path: Path) -> Any:
    # The server already caches a GGUF's tokenizer as tokenizer.json; share that cache so
    # the CLI and the engine agree on ids and the 4 s GGUF parse happens once per machine.
    from kvctl.common.model import load_gguf_tokenizer

    return load_gguf_tokenizer(path)


def load_tokenizer(spec: str | None = None) -> Any:
    """Resolve ``spec`` to a transformers tokenizer, offline (memoized per process)."""
    return _load_tokenizer(spec or DEFAULT_TOKENIZER)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str) -> Any:
    """Resolve ``spec`` to a transformers tokenizer, offline.

    ``smollm2`` / ``llama3`` (built-ins), a ``.gguf`` file, a ``tokenizer.json`` file, a
    local directory, or a hub id already in the local HuggingFace cache. ``None`` means
    the default, the tokenizer of the model ``kvctl serve`` runs.
    """
    if spec == "llama3":
        return load_llama3()
    if spec == "smollm2":
        from kvctl.common.model import ModelNotFoundError, smollm2_gguf_path

        try:
            return _load_gguf(smollm2_gguf_path())
        except ModelNotFoundError as exc:
            raise TokenizerError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path)
        if path.name.endswith(".json"):
            from transformers import PreTrainedTokenizerFast

            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(path))
            except Exception as exc:
                raise TokenizerError(f"{path}: not a tokenizer.json ({exc})") from None
        raise TokenizerError(f"{path}: expected a .gguf file, a tokenizer.json or a directory")
    from transformers import AutoTokenizer

    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{path}: no tokenizer found in this directory ({exc})"
                                 ) from None
    if path.exists():
        raise TokenizerError(f"{spec}: not a tokenizer file or directory")
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise TokenizerError(
            f"tokenizer {spec!r} is not a built-in ({', '.join(BUILTIN_TOKENIZERS)}), a local "
            "path, or a hub id in the local HuggingFace cache; nothing is downloaded here: "
            "copy the model's tokenizer files and pass their directory") from None


def encode_prompt(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the special tokens vLLM's /tokenize adds (BOS for Llama)."""
    return [int(t) for t in tok(text, add_special_tokens=True)["input_ids"]]
