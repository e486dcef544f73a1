"""`kvctl inspect FILE`: what a stored KV chunk holds, read from its header.

Reads any kvctl codec blob (a file `kvctl` or the server wrote, or a chunk LMCache stored
through the kvctl plugin) and the plugin's raw frames (MLA, multi-group and fp8 chunks).
Nothing is decoded: the header names codec, shape and dtype, and the checksum is verified.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from kvctl.errors import KvctlError
from kvctl.output import fmt_bytes, kv_table
from kvctl.state import state

# A chunk is a few MB; this bound only stops `kvctl inspect /dev/zero`-style mistakes
# from reading without end.
MAX_FILE_BYTES = 8 << 30


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise KvctlError(f"{path}: not a regular file")
        if size > MAX_FILE_BYTES:
            raise KvctlError(f"{path}: {size} bytes is larger than any KV chunk "
                             f"({MAX_FILE_BYTES} bytes at most)")
        return path.read_bytes()
    except FileNotFoundError:
        raise KvctlError(f"{path}: no such file") from None
    except PermissionError:
        raise KvctlError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise KvctlError(f"{path}: is a directory") from None


def _method(codec: str, params: dict[str, Any]) -> str:
    """The controller method string of a codec + params (e.g. cachegen-compact)."""
    level = params.get("level")
    if codec in ("cachegen", "kvtc") and level and level != "default":
        return f"{codec}-{level}"
    if codec == "kivi" and "bits" in params:
        return f"kivi-{params['bits']}"
    return codec


def describe_blob(data: bytes) -> dict[str, Any]:
    """Header facts of a codec blob or raw frame; raises kvctl.codecs errors on bad input."""
    from kvctl.codecs import ChecksumError, peek_blob
    from kvctl.integrations.lmcache.frame import is_frame, unpack_frame

    checksum_ok = True
    if is_frame(data):
        try:
            info, _ = unpack_frame(data, verify=True)
        except ChecksumError:
            checksum_ok = False
            info, _ = unpack_frame(data, verify=False)
        elements = sum(math.prod(s) for s in info.shapes)
        return {
            "format": "kvctl raw frame (LMCache layout the codecs do not take, stored exactly)",
            "codec": "raw-frame", "method": None, "params": {},
            "shapes": [list(s) for s in info.shapes], "dtypes": list(info.dtypes),
            "bytes": info.total_bytes, "fp16_bytes": 2 * elements,
            "ratio_vs_fp16": 2 * elements / info.total_bytes,
            "bits_per_element": 8 * info.total_bytes / elements if elements else 0.0,
            "checksum_ok": checksum_ok,
        }
    info = peek_blob(data)
    try:
        peek_blob(data, verify=True)
    except ChecksumError:
        checksum_ok = False
    L, _, T, H, D = info.shape
    elements = info.num_elements
    return {
        "format": "kvctl codec blob",
        "codec": info.codec, "method": _method(info.codec, info.params), "params": info.params,
        "shape": list(info.shape), "lmcache_shape": [2, L, T, H * D], "dtype": info.dtype,
        "tokens": T, "bytes": info.total_bytes, "fp16_bytes": 2 * elements,
        "ratio_vs_fp16": 2 * elements / info.total_bytes if info.total_bytes else 0.0,
        "bits_per_element": info.bits_per_element, "checksum_ok": checksum_ok,
        "format_version": info.version, **_basis_facts(info.params),
    }


def _basis_facts(params: dict[str, Any]) -> dict[str, Any]:
    """A transform-coded blob's basis: its id and whether this machine has it (and for
    which model), since decoding needs it."""
    if "basis" not in params:
        return {}
    from kvctl.codecs import CodecError
    from kvctl.codecs.basis import find_basis

    bid = params["basis"]
    if bid is None:
        return {"basis": None, "basis_found": True, "basis_model": None}
    try:
        b = find_basis(bid)
    except CodecError:
        return {"basis": bid, "basis_found": False, "basis_model": None}
    return {"basis": bid, "basis_found": True, "basis_model": b.model}


def inspect(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(
        metavar="FILE", show_default=False,
        help="A chunk file: a kvctl blob, or a .kvc file the LMCache plugin wrote.")],
) -> None:
    """Show a stored KV chunk's codec, level, shape, dtype, ratio vs fp16 and checksum.

    Exit 1 if the checksum does not match (the header is still shown).
    """
    from kvctl.codecs import BlobError
    from kvctl.integrations.lmcache.files import parse_chunk_filename

    data = _read(file)
    try:
        facts = describe_blob(data)
    except BlobError as exc:
        raise KvctlError(f"{file}: {exc}") from None
    facts = {"file": str(file), **facts}
    key = parse_chunk_filename(file.name)
    if key is not None:
        facts["lmcache_key"] = key
    out = state(ctx).out
    if out.json:
        out.print_json(facts)
    else:
        rows: list[tuple[str, str]] = [("file", str(file)), ("format", facts["format"])]
        if "shape" in facts:
            params = ", ".join(f"{k}={v}" for k, v in sorted(facts["params"].items()))
            rows += [("codec", f"{facts['codec']}" + (f" ({params})" if params else "")),
                     ("method", facts["method"]),
                     ("shape", f"{facts['shape']} (layers, K/V, tokens, kv heads, head dim)"),
                     ("LMCache shape", str(facts["lmcache_shape"])),
                     ("dtype", facts["dtype"])]
            if "basis" in facts:
                rows.append(("basis", "none (identity transform)" if facts["basis"] is None
                             else f"{facts['basis']} ("
                             + (f"found, model {facts['basis_model']}" if facts["basis_found"]
                                else "NOT on this machine: decoding fails") + ")"))
        else:
            rows += [("groups", ", ".join(f"{s} {d}" for s, d in
                                          zip(facts["shapes"], facts["dtypes"], strict=True)))]
        rows += [("size", f"{facts['bytes']} bytes ({fmt_bytes(facts['bytes'])})"),
                 ("ratio vs fp16", f"{facts['ratio_vs_fp16']:.2f}x "
                                   f"({facts['bits_per_element']:.2f} bits/element)"),
                 ("checksum", "ok" if facts["checksum_ok"] else "MISMATCH")]
        if key is not None:
            rows += [("LMCache model", str(key["model_name"])),
                     ("LMCache rank", f"{key['rank']} of {key['world_size']} "
                                      f"(kv_rank {key['kv_rank']:#010x}), "
                                      f"group {key['object_group_id']}"),
                     ("chunk hash", str(key["chunk_hash"]))]
        out.print(kv_table(rows, ("field", "value")))
    if not facts["checksum_ok"]:
        raise KvctlError(f"{file}: checksum mismatch: the chunk is corrupted")
