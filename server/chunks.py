"""Splitting token sequences into chunks and naming each chunk by its whole prefix.

A chunk's key hashes the previous chunk's key together with this chunk's token ids, so equal
keys mean equal prefixes. BLAKE2b over little-endian int64 ids is the same in every process
and on every machine, unlike Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_ROOT = b"kvctl-chunk-v1"


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
