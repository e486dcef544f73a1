"""What every storage location offers, and the errors it raises.

Backends store opaque blobs by key together with the number of tokens each chunk covers. The
blobs are normally kvctl codec blobs; a backend reads their header once (``codec_label``) so
that metrics and the lossy-stacking check know what codec each chunk holds without decoding.
Batch methods exist so that a remote backend can answer N chunks in one round trip; local
backends answer them with a loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvctl.codecs import CodecError, available_codecs, available_methods, codec_for_method
from kvctl.codecs import peek_blob as _peek

UNKNOWN_CODEC = "unknown"


class StorageError(RuntimeError):
    """A storage operation failed for a reason the operator can act on."""


class StorageFullError(StorageError):
    """A chunk does not fit even after evicting every unpinned chunk."""


@dataclass(frozen=True)
class BackendStats:
    chunks: int
    bytes: int
    capacity_bytes: int | None
    pinned_chunks: int
    # bytes held per codec label (see codec_label)
    bytes_by_codec: dict[str, int] = field(default_factory=dict)
    evictions: int = 0


_LABELS: dict[tuple[str, str], str] = {}


def _params_key(params: dict) -> str:
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


def label_for(name: str, params: dict) -> str:
    """The method string that names a codec and its parameters (``kivi-2``, ``cachegen``).

    Parameters no method string spells get ``name(k=v,...)``; a codec kvctl does not know is
    ``unknown`` so a foreign blob cannot create unbounded metric labels.
    """
    if not _LABELS:
        for m in available_methods():
            c = codec_for_method(m)
            _LABELS.setdefault((c.name, _params_key(c.params)), m)
    found = _LABELS.get((name, _params_key(params)))
    if found is not None:
        return found
    if name not in available_codecs():
        return UNKNOWN_CODEC
    return f"{name}({_params_key(params)})"


def codec_label(blob: bytes | bytearray | memoryview) -> str:
    """The codec label of a blob, read from its header only (``unknown`` if not a blob)."""
    try:
        info = _peek(blob)
    except CodecError:
        return UNKNOWN_CODEC
    return label_for(info.codec, info.params)


def codec_name(label: str) -> str:
    """The codec of a label (``kivi-2`` -> ``kivi``), for metrics labelled by codec."""
    if label == UNKNOWN_CODEC:
        return label
    try:
        return codec_for_method(label).name
    except CodecError:
        return label.split("(", 1)[0]


class StorageBackend(ABC):
    """A place that holds KV chunk blobs by key. Safe to call from several threads."""

    name: str

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, blob: bytes, num_tokens: int) -> None:
        """Store (or replace) a chunk; evicts unpinned chunks as needed."""

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> int:
        """Remove a chunk; returns the tokens it covered (0 if absent)."""

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def num_tokens(self, key: str) -> int: ...

    @abstractmethod
    def codec_of(self, key: str) -> str | None:
        """The codec label of a held chunk (None if absent)."""

    @abstractmethod
    def set_pinned_many(self, keys: Sequence[str], pinned: bool) -> int:
        """Pin or unpin the present ones of ``keys``; returns how many were present."""

    @abstractmethod
    def stats(self) -> BackendStats: ...

    # ---- batch forms; a remote backend answers them in one round trip -----------------
    def set_pinned(self, key: str, pinned: bool) -> bool:
        """Pin or unpin a present chunk; False if the chunk is absent."""
        return self.set_pinned_many([key], pinned) == 1

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def codecs_many(self, keys: Sequence[str]) -> list[str | None]:
        return [self.codec_of(k) for k in keys]

    def put_many(self, items: Iterable[tuple[str, bytes, int]],
                 protect: Sequence[str] = ()) -> int:
        """Store chunks in order; stops at the first that does not fit (StorageFullError
        raised only if none fit). ``protect``: keys that must not be evicted to make room
        (the other chunks of the same prompt). Returns how many were stored."""
        done = 0
        for key, blob, ntok in items:
            try:
                self.put_protected(key, blob, ntok, protect)
            except StorageFullError:
                if done == 0:
                    raise
                break
            done += 1
        return done

    def put_protected(self, key: str, blob: bytes, num_tokens: int,
                      protect: Sequence[str]) -> None:
        """``put`` that never evicts a key in ``protect``; backends without eviction ignore
        it."""
        self.put(key, blob, num_tokens)

    def pin_refusal(self) -> str | None:
        """Why this location cannot honour a pin (None: it can). A pin it accepted holds:
        no eviction of this tier's own or the server's removes a pinned chunk."""
        return None

    def quarantine(self, key: str) -> str:
        """Take a corrupt chunk out of service; returns what became of it (for the log).
        A tier that keeps nothing of it deletes it; the disk tier keeps the file aside."""
        self.delete(key)
        return "deleted"

    def clear(self) -> int:
        """Remove every chunk; returns the tokens they covered."""
        return sum(self.delete(k) for k in self.keys())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""
