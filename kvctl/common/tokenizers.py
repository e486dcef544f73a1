"""Tokenizer resolution: built-ins, GGUF files, tokenizer.json files, directories, hub ids.

Every tokenizer ends up as a `tokenizers.Tokenizer` read from a ``tokenizer.json``; what
needs transformers (the tiktoken file of Llama 3, the vocabulary inside a GGUF, a directory
without a tokenizer.json) is converted once and the result cached under
``kvctl.common.paths.cache_root()``. So a warm `kvctl tokenize` never imports transformers
(about 3 s of a 2-core machine's time), and the ids are the ones transformers gives
(tests/test_tokenizers.py compares them).

The server may use this module too: it imports nothing from the CLI and raises
`TokenizerError` (a ValueError) rather than CLI errors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from kvctl.common.defaults import DEFAULT_TOKENIZER as _DEFAULT_TOKENIZER
from kvctl.common.paths import atomic_write, cache_root, file_tag

BUILTIN_TOKENIZERS = ("smollm2", "gemma3", "llama3")  # the embedded models' and Llama 3's
DEFAULT_TOKENIZER = _DEFAULT_TOKENIZER  # the model `kvctl serve` runs

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
# the files of a tokenizer directory whose content decides the ids
_DIR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be resolved on this machine; the message says why."""


class Tokenizer:
    """A `tokenizers.Tokenizer` with the conventions of vLLM's /tokenize (special tokens
    added: BOS for Llama 3, nothing for SmolLM2)."""

    def __init__(self, backend: Any, name: str) -> None:
        self.backend = backend
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def to_str(self) -> str:
        return str(self.backend.to_str())


def _from_file(path: Path, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        return Tokenizer(Backend.from_file(str(path)), name)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{path}: not a tokenizer.json ({exc})") from None


def _store(path: Path, backend: Any) -> None:
    try:
        atomic_write(path, backend.to_str().encode(), durable=False)
    except OSError:
        pass  # a read-only cache only costs the conversion time next run


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


def llama3_cache_file() -> Path:
    return (cache_root() / "tokenizers" / f"llama3-{file_tag(llama3_model_file())}"
            / "tokenizer.json")


def load_llama3() -> Tokenizer:
    """Llama 3's tokenizer from `llama-models`, converted once and cached as tokenizer.json."""
    cached = llama3_cache_file()
    if cached.is_file():
        return _from_file(cached, "llama3")
    backend = _build_llama3(llama3_model_file())
    _store(cached, backend)
    return Tokenizer(backend, "llama3")


def load_gguf(path: Path, name: str | None = None) -> Tokenizer:
    """The tokenizer inside a GGUF file, from the tokenizer.json the server caches too.

    The CLI and the engine share ``gguf_cache_dir(gguf)/tokenizer``, so they agree on ids
    and the GGUF parse (transformers, seconds) happens once per machine.
    """
    from kvctl.common.model import gguf_cache_dir, load_gguf_tokenizer

    cached = gguf_cache_dir(path) / "tokenizer" / "tokenizer.json"
    if cached.is_file():
        return _from_file(cached, name or str(path))
    try:
        tok = load_gguf_tokenizer(path)  # writes the cache folder
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot read a tokenizer from this GGUF file ({exc})"
                             ) from None
    return Tokenizer(tok.backend_tokenizer, name or str(path))


def _dir_cache_file(path: Path) -> Path:
    """Cache key of a directory: its path and the size/mtime of each tokenizer file."""
    h = hashlib.blake2b(str(path.resolve()).encode(), digest_size=8)
    for name in _DIR_FILES:
        f = path / name
        if f.is_file():
            h.update(f"{name}:{file_tag(f)}".encode())
    return cache_root() / "tokenizers" / f"dir-{h.hexdigest()}" / "tokenizer.json"


def _via_transformers(source: str, name: str, cached: Path | None) -> Tokenizer:
    """Load with transformers (its config may adjust special tokens), keep the backend."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{name}: no tokenizer found ({exc})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{name}: only fast tokenizers (a tokenizer.json, or files "
                             "transformers converts to one) are supported")
    if cached is not None:
        _store(cached, backend)
    return Tokenizer(backend, name)


def load_tokenizer(spec: str | None = None) -> Tokenizer:
    """Resolve ``spec`` to a tokenizer, offline (memoized per process).

    ``smollm2`` / ``gemma3`` / ``llama3`` (built-ins), a ``.gguf`` file, a
    ``tokenizer.json`` file, a local directory, or a hub id already in the local
    HuggingFace cache. ``None`` means the default, the tokenizer of the model ``kvctl
    serve`` runs.
    """
    return _load_tokenizer(spec or DEFAULT_TOKENIZER)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str) -> Tokenizer:
    if spec == "llama3":
        return load_llama3()
    if spec in BUILTIN_TOKENIZERS:  # an embedded model's: the one inside its GGUF
        from kvctl.common.model import BUILTINS, ModelNotFoundError

        try:
            return load_gguf(BUILTINS[spec].gguf(), spec)
        except ModelNotFoundError as exc:
            raise TokenizerError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path)
        if path.name.endswith(".json"):
            return _from_file(path, str(path))
        raise TokenizerError(f"{path}: expected a .gguf file, a tokenizer.json or a directory")
    if path.is_dir():
        cached = _dir_cache_file(path)
        if cached.is_file():
            return _from_file(cached, str(path))
        return _via_transformers(str(path), str(path), cached)
    if path.exists():
        raise TokenizerError(f"{spec}: not a tokenizer file or directory")
    try:
        # a hub id: transformers finds it in the local cache (it may update, so no copy)
        return _via_transformers(spec, spec, None)
    except TokenizerError:
        raise TokenizerError(
            f"tokenizer {spec!r} is not a built-in ({', '.join(BUILTIN_TOKENIZERS)}), a local "
            "path, or a hub id in the local HuggingFace cache; nothing is downloaded here: "
            "copy the model's tokenizer files and pass their directory") from None


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the special tokens vLLM's /tokenize adds (BOS for Llama)."""
    return tok.encode(text)
