"""How an LMCache multiprocess (MP) server names a chunk of KV, computed the same way here.

The CLI (to turn a prompt into keys before it asks a coordinator) and kvctl's coordinator
(to resolve ``token_ids`` in lookups, pins and deletes) both import this module, so the two
always agree with each other and with the servers that stored the chunks.

- A chunk hash is a blake3 chain over whole chunks of ``chunk_size`` tokens (256 for every
  LMCache MP server): the first chunk's prefix is the hash of a fixed seed (eight zero bytes
  and the single token 0), each later chunk's prefix is the previous chunk's digest, and the
  tokens are hashed as big-endian uint32. A trailing partial chunk has no hash.
- ``kv_rank`` packs ``world_size << 24 | global_rank << 16 | local_world_size << 8 |
  local_rank``; a lookup for ``world_size`` W fans out to ranks 0..W-1 with local world size
  W (one process: 16777472).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

DEFAULT_CHUNK_SIZE = 256
MAX_TOKEN_IDS = 1_000_000  # LMCache's cap on one request's token_ids
MAX_TOKEN_ID = 0xFFFF_FFFF  # hashed as uint32
_SALT_FORBIDDEN = frozenset("@/\\\x00")
MAX_SALT_CHARS = 128


def kv_rank(world_size: int, global_rank: int, local_world_size: int, local_rank: int) -> int:
    """LMCache's packed rank of one KV slice (8 bits per field)."""
    return (world_size << 24) | (global_rank << 16) | (local_world_size << 8) | local_rank


def world_size_of(rank: int) -> int:
    return rank >> 24


def lookup_ranks(world_size: int) -> list[int]:
    """The ranks a lookup of ``world_size`` addresses (as LMCache's coordinator expands them)."""
    return [kv_rank(world_size, r, world_size, r) for r in range(world_size)]


def _seed() -> bytes:
    h = blake3.blake3()
    h.update((0).to_bytes(8, "big", signed=True))
    h.update(struct.pack(">1I", 0))
    return h.digest()


_SEED = _seed()


def chunk_hashes(token_ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """The chain of 32-byte digests of the whole chunks of ``token_ids``.

    Raises ValueError for a token id that is not a uint32 (a server could not have stored it).
    """
    out: list[bytes] = []
    prefix = _SEED
    whole = len(token_ids) - len(token_ids) % chunk_size
    for i in range(0, whole, chunk_size):
        chunk = token_ids[i:i + chunk_size]
        try:
            packed = struct.pack(f">{len(chunk)}I", *chunk)
        except struct.error:
            bad = next(t for t in chunk if not (isinstance(t, int) and 0 <= t <= MAX_TOKEN_ID))
            raise ValueError(f"token id {bad!r} is not a uint32") from None
        h = blake3.blake3(prefix)
        h.update(packed)
        prefix = h.digest()
        out.append(prefix)
    return out


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """One stored object of an MP server: a chunk of one rank of one model (and tenant)."""

    chunk_hash_hex: str
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""

    def to_wire(self) -> dict[str, object]:
        return {"chunk_hash_hex": self.chunk_hash_hex, "model_name": self.model_name,
                "kv_rank": self.kv_rank, "object_group_id": self.object_group_id,
                "cache_salt": self.cache_salt}


def check_key_fields(model_name: str, cache_salt: str) -> None:
    """The field rules LMCache's servers enforce (their storage uses ``@`` and ``/`` as
    separators); ValueError names the broken one."""
    if "@" in model_name:
        raise ValueError(f"model_name must not contain '@' (got {model_name[:100]!r})")
    if _SALT_FORBIDDEN & set(cache_salt):
        raise ValueError("cache_salt must not contain '@', '/', '\\' or NUL")
    if len(cache_salt) > MAX_SALT_CHARS:
        raise ValueError(f"cache_salt is longer than {MAX_SALT_CHARS} characters")


def resolve_keys(token_ids: Sequence[int], model_name: str, world_size: int = 1,
                 cache_salt: str = "", chunk_size: int = DEFAULT_CHUNK_SIZE
                 ) -> tuple[list[ObjectKey], int]:
    """The object keys of the whole chunks of ``token_ids`` (chunk-major, then rank) and the
    number of chunks, as LMCache resolves a lookup, pin, delete or prefetch request."""
    if len(token_ids) > MAX_TOKEN_IDS:
        raise ValueError(f"too many token_ids in one request (limit {MAX_TOKEN_IDS}, got "
                         f"{len(token_ids)})")
    if world_size < 1 or world_size > 255:
        raise ValueError(f"world_size must be 1..255 (got {world_size})")
    check_key_fields(model_name, cache_salt)
    hashes = chunk_hashes(token_ids, chunk_size)
    ranks = lookup_ranks(world_size)
    keys = [ObjectKey(h.hex(), model_name, r, 0, cache_salt) for h in hashes for r in ranks]
    return keys, len(hashes)
