"""Splitting token sequences into chunks and naming each chunk by its whole prefix.

A chunk's key hashes the previous chunk's key together with this chunk's token ids, so equal
keys mean equal prefixes. BLAKE2b over little-endian int64 ids is the same in every process
and on every machine, unlike Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvctl.codecs import BlobInfo

_ROOT = b"kvctl-chunk-v1"
# A key is the hex of a 16-byte BLAKE2b digest; nothing else names a chunk anywhere (a
# file, a Redis key, a URL path), so a key that does not match is refused wherever one
# arrives from outside.
KEY_PATTERN = "^[0-9a-f]{32}$"
_KEY = re.compile(KEY_PATTERN)
# What a chunk blob may claim when nothing narrower is configured (max_chunk_elements):
# 64 Mi elements, e.g. 256 tokens of an 80-layer model with 8 KV heads of 128 (42 Mi).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 26


def is_chunk_key(key: object) -> bool:
    return isinstance(key, str) and _KEY.match(key) is not None


def check_chunk_key(key: object) -> str:
    """``key`` if it is a chunk key (32 lowercase hex digits); ValueError naming it if not."""
    if not is_chunk_key(key):
        shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
        raise ValueError(f"{shown} is not a chunk key (32 lowercase hex digits)")
    return key  # type: ignore[return-value]


class ChunkShapeError(ValueError):
    """A blob claims a shape no chunk of this deployment has: it is not decoded."""


def check_chunk_shape(info: BlobInfo, chunk_size: int, max_elements: int,
                      num_tokens: int | None = None) -> None:
    """Refuse a blob (from a worker, a file, Redis, a serde) before decoding it unless its
    header's shape is one this deployment stores: at most ``chunk_size`` tokens (exactly
    ``num_tokens`` when the sender said how many) and at most ``max_elements`` elements, so
    a small blob cannot claim gigabytes."""
    shape = "x".join(str(d) for d in info.shape)
    if len(info.shape) == 5:
        tokens = info.shape[2]
        if tokens > chunk_size:
            raise ChunkShapeError(f"chunk claims {tokens} tokens (shape {shape}); this "
                                  f"deployment's chunks hold at most {chunk_size}")
        if num_tokens is not None and tokens != num_tokens:
            raise ChunkShapeError(f"chunk claims {tokens} tokens (shape {shape}) but was sent "
                                  f"as {num_tokens}")
    if info.num_elements > max_elements:
        raise ChunkShapeError(f"chunk claims {info.num_elements} elements (shape {shape}), "
                              f"more than max_chunk_elements ({max_elements}) allows")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a token sequence: its key and the token range it covers."""

    key: str
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chunk_refs(tokens: Sequence[int], chunk_size: int) -> list[ChunkRef]:
    """Keys of the consecutive chunks of ``tokens``; the last partial chunk is kept."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    ids = np.asarray(tokens, dtype="<i8")
    refs: list[ChunkRef] = []
    prev = hashlib.blake2b(_ROOT + chunk_size.to_bytes(4, "little"), digest_size=16).digest()
    for start in range(0, len(ids), chunk_size):
        end = min(start + chunk_size, len(ids))
        digest = hashlib.blake2b(prev + ids[start:end].tobytes(), digest_size=16).digest()
        refs.append(ChunkRef(digest.hex(), start, end))
        prev = digest
    return refs
