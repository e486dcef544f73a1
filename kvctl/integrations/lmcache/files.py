"""Names of the chunk files ``KvctlFSL2Adapter`` writes (no LMCache import needed).

``<model>@<kv_rank as 0x%08x>@<object group hex>@<chunk hash hex>[@<cache salt>].kvc``,
with ``/`` in the model name written as ``-SEP-`` (LMCache's own FS adapter convention).
LMCache forbids ``@`` in model names and salts, so a name splits back unambiguously.
"""

from __future__ import annotations

import re

FILE_EXT = ".kvc"
SEP = "@"
SLASH = "-SEP-"
_HEX = re.compile(r"[0-9a-f]+")


def chunk_filename(model_name: str, kv_rank: int, object_group_id: int, chunk_hash: bytes,
                   cache_salt: str = "") -> str:
    parts = [model_name.replace("/", SLASH), f"{kv_rank:#010x}", f"{object_group_id:x}",
             chunk_hash.hex()]
    if cache_salt:
        parts.append(cache_salt)
    return SEP.join(parts) + FILE_EXT


def parse_chunk_filename(name: str) -> dict[str, object] | None:
    """The key fields a chunk file's name carries, or None for any other name."""
    if not name.endswith(FILE_EXT):
        return None
    parts = name[:-len(FILE_EXT)].split(SEP)
    if len(parts) not in (4, 5):
        return None
    model, rank, group, digest = parts[:4]
    if (not rank.startswith("0x") or not _HEX.fullmatch(rank[2:]) or not _HEX.fullmatch(group)
            or not _HEX.fullmatch(digest)):
        return None
    rank_i = int(rank, 16)
    return {"model_name": model.replace(SLASH, "/"), "kv_rank": rank_i,
            # LMCache packs (world size, rank, local world size, local rank) into kv_rank
            "world_size": rank_i >> 24 & 0xFF, "rank": rank_i >> 16 & 0xFF,
            "object_group_id": int(group, 16), "chunk_hash": digest,
            "cache_salt": parts[4] if len(parts) == 5 else ""}
