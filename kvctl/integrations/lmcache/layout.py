"""LMCache's chunk layout and kvctl's.

LMCache (multiprocess server, 0.5.x) hands a serializer one chunk shaped
``[2, num_layers, chunk_tokens, num_kv_heads_per_rank * head_dim]`` (K at 0, V at 1; MLA
has a kv size of 1). kvctl's codecs take ``[num_layers, 2, tokens, kv_heads, head_dim]``.
The head split is not in LMCache's layout, so ``head_dim`` comes from configuration.
No LMCache import here: the benchmark and ``kvctl inspect`` use this module without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KV_DTYPES = ("float16", "bfloat16", "float32")

def codec_layout_ok(shape: tuple[int, ...], dtype_name: str, head_dim: int) -> bool:
    """Whether a chunk of this LMCache shape and dtype maps onto kvctl's codec layout."""
    return (len(shape) == 4 and shape[0] == 2 and all(s > 0 for s in shape)
            and head_dim > 0 and shape[3] % head_dim == 0 and dtype_name in KV_DTYPES)


def kvctl_shape(lmc_shape: tuple[int, ...], head_dim: int) -> tuple[int, int, int, int, int]:
    """``[2, L, T, H*D]`` -> ``[L, 2, T, H, D]``."""
    _, layers, tokens, width = lmc_shape
    return (layers, 2, tokens, width // head_dim, head_dim)


def to_kvctl(chunk: torch.Tensor, head_dim: int) -> torch.Tensor:
    """An LMCache chunk ``[2, L, T, H*D]`` as kvctl KV ``[L, 2, T, H, D]`` (a contiguous copy)."""
    two, layers, tokens, width = chunk.shape
    if two != 2 or width % head_dim:
        raise ValueError(f"LMCache chunk {list(chunk.shape)} is not [2, layers, tokens, "
                         f"heads*{head_dim}]")
    return (chunk.view(2, layers, tokens, width // head_dim, head_dim)
            .permute(1, 0, 2, 3, 4).contiguous())


def to_lmcache(kv: torch.Tensor) -> torch.Tensor:
    """kvctl KV ``[L, 2, T, H, D]`` as an LMCache chunk ``[2, L, T, H*D]`` (contiguous)."""
    layers, two, tokens, heads, dim = kv.shape
    if two != 2:
        raise ValueError(f"kvctl KV {list(kv.shape)} is not [layers, 2, tokens, heads, dim]")
    return kv.permute(1, 0, 2, 3, 4).reshape(2, layers, tokens, heads * dim).contiguous()
