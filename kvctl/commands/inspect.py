"""`kvctl inspect FILE | DIR | redis://...`: what stored KV chunks hold, read from headers.

Reads any kvctl codec blob (a file `kvctl` or the server wrote, or a chunk LMCache stored
through the kvctl plugin) and the plugin's raw frames (MLA, multi-group and fp8 chunks).
Nothing is decoded: the header names codec, shape and dtype, and the checksum is verified.
A directory gets a summary per method; a Redis URL a chunk the server stored there (by key)
or, without a key, a summary of an instance's chunks.
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
# a directory or Redis summary looks at this many chunks at most (and says so)
MAX_SCAN = 100_000
# files named in a summary's lists of bad ones
MAX_NAMED = 20


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
        "format_version": info.version, "history": list(info.history),
        **_basis_facts(info.params),
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
    target: Annotated[str, typer.Argument(
        metavar="FILE|DIR|REDIS_URL", show_default=False,
        help="A chunk file (a kvctl blob, or a .kvc file the LMCache plugin wrote), a "
             "directory of them (a summary per method), or redis://HOST:PORT[/DB] (the "
             "chunks kvctl serve stored there).")],
    key: Annotated[str | None, typer.Argument(
        metavar="[KEY]", show_default=False,
        help="With a Redis URL: the chunk's key, as the server's log and errors name it; "
             "without, a summary of the instance's chunks.")] = None,
    key_prefix: Annotated[str, typer.Option(
        "--key-prefix", metavar="PREFIX",
        help="With a Redis URL: the server's remote_key_prefix.")] = "kvctl",
) -> None:
    """Show stored KV chunks: codec, level, shape, dtype, ratio vs fp16 and checksum.

    A directory: chunks, tokens and bytes per method. Exit 1 if a checksum does not match
    (the header is still shown). The Redis instance is --instance-id's.
    """
    st = state(ctx)
    if "://" in target:
        if not target.startswith(("redis://", "rediss://", "unix://")):
            raise KvctlError(f"{target.split('://', 1)[0]}:// is not a location inspect "
                             "reads: give a file, a directory or a redis:// URL")
        _inspect_redis(st, target, key, key_prefix)
        return
    if key is not None:
        raise KvctlError("KEY goes with a Redis URL; a file or directory takes none")
    path = Path(target)
    if path.is_dir():
        _inspect_dir(st, path)
        return
    _inspect_file(st, path)


def _lines(rows: list[tuple[str, str]]) -> str:
    """``field  value`` lines: a long value (a hash, a path) is never cut or folded, so it
    can be copied whole from an 80-column terminal."""
    width = max(len(f) for f, _ in rows)
    return "\n".join(f"{f:<{width}}  {v}" for f, v in rows)


def _facts_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("format", facts["format"])]
    if "shape" in facts:
        params = ", ".join(f"{k}={v}" for k, v in sorted(facts["params"].items()))
        rows += [("codec", f"{facts['codec']}" + (f" ({params})" if params else "")),
                 ("method", str(facts["method"])),
                 ("shape", f"{facts['shape']} (layers, K/V, tokens, kv heads, head dim)"),
                 ("LMCache shape", str(facts["lmcache_shape"])),
                 ("dtype", facts["dtype"])]
        if facts.get("history"):
            rows.append(("lossy history", ", ".join(facts["history"])))
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
    return rows


def _inspect_file(st: Any, file: Path) -> None:
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

    def human() -> str:
        rows = [("file", str(file)), *_facts_rows(facts)]
        if key is not None:
            rows += [("LMCache model", str(key["model_name"])),
                     ("LMCache rank", f"{key['rank']} of {key['world_size']} "
                                      f"(kv_rank {key['kv_rank']:#010x}), "
                                      f"group {key['object_group_id']}"),
                     ("chunk hash", str(key["chunk_hash"]))]
        return _lines(rows)

    st.out.result(facts, human)
    if not facts["checksum_ok"]:
        raise KvctlError(f"{file}: checksum mismatch: the chunk is corrupted")


def _inspect_dir(st: Any, root: Path) -> None:
    """Every chunk file under ``root``: chunks, tokens and bytes per method, and the files
    that are not chunks or fail their checksum."""
    from kvctl.codecs import BlobError

    by_method: dict[str, dict[str, Any]] = {}
    not_chunks: list[str] = []
    mismatched: list[str] = []
    n_not, n_bad, seen = 0, 0, 0
    truncated = False
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue  # temporaries of atomic writes are dot files
        if seen >= MAX_SCAN:
            truncated = True
            break
        seen += 1
        try:
            facts = describe_blob(_read(path))
        except (BlobError, KvctlError):
            n_not += 1
            if len(not_chunks) < MAX_NAMED:
                not_chunks.append(str(path.relative_to(root)))
            continue
        m = str(facts["method"] or facts["codec"])
        row = by_method.setdefault(m, {"chunks": 0, "tokens": 0, "bytes": 0, "fp16_bytes": 0})
        row["chunks"] += 1
        row["tokens"] += int(facts.get("tokens") or 0)
        row["bytes"] += facts["bytes"]
        row["fp16_bytes"] += facts["fp16_bytes"]
        if not facts["checksum_ok"]:
            n_bad += 1
            if len(mismatched) < MAX_NAMED:
                mismatched.append(str(path.relative_to(root)))
    for row in by_method.values():
        row["ratio_vs_fp16"] = row["fp16_bytes"] / row["bytes"] if row["bytes"] else 0.0
    data = {"directory": str(root), "files": seen, "truncated": truncated,
            "by_method": dict(sorted(by_method.items())), "not_chunks": n_not,
            "not_chunks_named": not_chunks, "checksum_mismatches": n_bad,
            "checksum_mismatches_named": mismatched}

    def human() -> Any:
        if not by_method:
            return f"{root}: no chunk files ({n_not} other file(s))"
        table = kv_table([(m, r["chunks"], r["tokens"], fmt_bytes(r["bytes"]),
                           f"{r['ratio_vs_fp16']:.2f}x") for m, r in data["by_method"].items()],
                         ("method", "chunks", "tokens", "bytes", "ratio"))
        return table

    st.out.result(data, human)
    if not st.out.json:
        if n_not:
            st.out.note(f"{n_not} file(s) are not chunks: {', '.join(not_chunks)}"
                        + (" ..." if n_not > len(not_chunks) else ""))
        if truncated:
            st.out.note(f"stopped after {MAX_SCAN} files")
    if n_bad:
        raise KvctlError(f"{n_bad} chunk file(s) fail their checksum: {', '.join(mismatched)}"
                         + (" ..." if n_bad > len(mismatched) else ""))


def _redis_display(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        if u.password:
            return url.replace(u.password, "***", 1)
    except ValueError:
        return "the Redis URL"
    return url


def _inspect_redis(st: Any, url: str, key: str | None, prefix: str) -> None:
    """A chunk `kvctl serve` stored in Redis (hash ``PREFIX:INSTANCE:c:KEY``, blob in field
    ``b``), or a summary of the instance's chunks by the codec label the server recorded."""
    import redis

    shown = _redis_display(url)
    instance = st.settings.instance_id
    ns = f"{prefix}:{instance}:c:"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        if key is not None:
            full = key if key.startswith(ns) else ns + key
            blob = client.hget(full, "b")
            if blob is None:
                raise KvctlError(f"{shown}: no chunk {full!r} (instance {instance}; "
                                 "--instance-id and --key-prefix name others)")
            _redis_chunk(st, shown, full, blob)
            return
        by_codec: dict[str, dict[str, int]] = {}
        seen, truncated = 0, False
        for k in client.scan_iter(match=ns + "*", count=1000):
            if seen >= MAX_SCAN:
                truncated = True
                break
            seen += 1
            label, size, tokens = client.pipeline(transaction=False).hget(k, "c").hstrlen(
                k, "b").hget(k, "n").execute()
            name = label.decode() if isinstance(label, bytes) else "unknown"
            row = by_codec.setdefault(name, {"chunks": 0, "tokens": 0, "bytes": 0})
            row["chunks"] += 1
            row["bytes"] += int(size or 0)
            row["tokens"] += int(tokens or 0)
    except redis.RedisError as exc:
        raise KvctlError(f"{shown}: {type(exc).__name__}: "
                         f"{str(exc).replace(url, shown)}") from None
    data = {"redis": shown, "instance_id": instance, "key_prefix": prefix, "chunks": seen,
            "truncated": truncated, "by_method": dict(sorted(by_codec.items()))}
    st.out.result(data, lambda: kv_table(
        [(m, r["chunks"], r["tokens"], fmt_bytes(r["bytes"]))
         for m, r in data["by_method"].items()], ("method", "chunks", "tokens", "bytes"))
        if by_codec else f"{shown}: no chunks of instance {instance} under {prefix}:")


def _redis_chunk(st: Any, shown: str, full: str, blob: bytes) -> None:
    from kvctl.codecs import BlobError

    try:
        facts = describe_blob(blob)
    except BlobError as exc:
        raise KvctlError(f"{shown} {full}: {exc}") from None
    facts = {"redis": shown, "redis_key": full, **facts}
    st.out.result(facts, lambda: _lines([("redis", shown), ("key", full),
                                         *_facts_rows(facts)]))
    if not facts["checksum_ok"]:
        raise KvctlError(f"{full}: checksum mismatch: the chunk is corrupted")
