"""The self-describing blob container every codec writes.

Layout (little endian)::

    magic      4 bytes  b"KVZ1"
    version    u8       FORMAT_VERSION
    reserved   u8       0
    hdr_len    u16      length of the JSON header
    header     JSON     {"codec": str, "params": {...}, "shape": [5 ints], "dtype": str,
                         "history": [str, ...] (optional: the lossy methods the KV went
                         through before this encoding, oldest first)}
    pay_len    u64      length of the payload
    payload    bytes    codec specific
    crc32      u32      zlib.crc32 of everything above

JSON rather than pickle: a blob from an untrusted store can at worst fail to parse. The
checksum is checked before the header is trusted, so a flipped bit anywhere is reported as
a ``ChecksumError`` instead of being decoded into plausible garbage.

A checksum is no defence against a hostile writer (anyone can recompute it), so the header
is also bounded by what its payload can hold: nesting at most ``MAX_HEADER_DEPTH`` deep,
every dimension below 2**31, at most ``MAX_ELEMENTS`` elements in all, and at most
``MAX_ELEMENTS_PER_BYTE`` elements per payload byte (each codec then applies its own,
tighter bound before it allocates: ``BaseCodec.max_elements_per_byte``).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvctl.codecs.errors import (
    ChecksumError,
    CorruptBlobError,
    ForeignBlobError,
    TruncatedBlobError,
    UnsupportedVersionError,
)

MAGIC = b"KVZ1"
FORMAT_VERSION = 2  # 2: cachegen keys get one step per (layer, head)
_PREFIX = struct.Struct("<4sBBH")
_PAYLEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
MIN_BLOB = _PREFIX.size + _PAYLEN.size + _CRC.size

DTYPES = ("float16", "bfloat16", "float32")
# A header may not claim more elements than this (8 GiB of fp16), whatever its payload.
MAX_ELEMENTS = 1 << 32
MAX_DIM = (1 << 31) - 1
# No codec decodes more elements than this from one payload byte: the most compressible
# one, cachegen's rANS coder, is physically limited to about 383 (rans.elements_per_byte).
# A codec that could exceed it must raise this bound.
MAX_ELEMENTS_PER_BYTE = 512
# {"codec", "params": {...}, "shape": [...]} is 2 deep; a little room for structured params.
MAX_HEADER_DEPTH = 8
# The closing quote is optional so an unterminated string is still one match: the scan
# stays linear (a mandatory one lets every quote restart a scan to the end).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
# a history names distinct methods, so it stays short; a header claiming more is corrupt
MAX_HISTORY = 16
MAX_HISTORY_NAME = 64


@dataclass(frozen=True)
class BlobInfo:
    """What a blob holds, read from its header without decoding the payload."""

    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: str = "float16"
    payload_bytes: int = 0
    total_bytes: int = 0
    version: int = FORMAT_VERSION
    # lossy methods the KV went through before this encoding (decompressing keeps them)
    history: tuple[str, ...] = ()

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def num_tokens(self) -> int:
        return self.shape[2] if len(self.shape) == 5 else 0

    @property
    def bits_per_element(self) -> float:
        n = self.num_elements
        return 8.0 * self.total_bytes / n if n else 0.0


def pack(codec: str, params: dict[str, Any], shape: tuple[int, ...], dtype: str,
         payload: bytes | bytearray | memoryview, history: Sequence[str] = ()) -> bytes:
    """Wrap a codec payload into a checksummed blob (``history``: see BlobInfo)."""
    fields: dict[str, Any] = {"codec": codec, "params": params, "shape": list(shape),
                              "dtype": dtype}
    if history:  # only when there is one: blobs without it stay byte for byte as before
        fields["history"] = _check_history(list(history))
    header = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    if len(header) > 0xFFFF:
        raise CorruptBlobError("codec header too large")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)) + header
    paylen = _PAYLEN.pack(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(paylen, zlib.crc32(head)))
    return b"".join((head, paylen, bytes(payload), _CRC.pack(crc)))


def _parse(blob: bytes | bytearray | memoryview, verify: bool) -> tuple[BlobInfo, memoryview]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ForeignBlobError(f"expected bytes, got {type(blob).__name__}")
    mv = memoryview(blob).cast("B") if isinstance(blob, memoryview) else memoryview(blob)
    n = len(mv)
    if n < 4 or bytes(mv[:4]) != MAGIC:
        if n < 4 and MAGIC.startswith(bytes(mv)):
            raise TruncatedBlobError(f"blob is {n} bytes, shorter than the 4-byte magic")
        raise ForeignBlobError("not a kvctl codec blob (bad magic "
                               f"{bytes(mv[:4])!r}, expected {MAGIC!r})")
    if n < MIN_BLOB:
        raise TruncatedBlobError(f"blob is {n} bytes, shorter than the smallest blob "
                                 f"({MIN_BLOB} bytes)")
    _, version, _, hlen = _PREFIX.unpack_from(mv, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"blob format version {version}; this kvctl reads version {FORMAT_VERSION}")
    off = _PREFIX.size + hlen
    if n < off + _PAYLEN.size + _CRC.size:
        raise TruncatedBlobError(f"blob is {n} bytes, its header alone needs "
                                 f"{off + _PAYLEN.size + _CRC.size}")
    (plen,) = _PAYLEN.unpack_from(mv, off)
    pstart = off + _PAYLEN.size
    need = pstart + plen + _CRC.size
    if n < need:
        raise TruncatedBlobError(f"blob is {n} bytes, its header says {need}")
    if n > need:
        raise CorruptBlobError(f"blob has {n - need} trailing bytes after its checksum")
    if verify:
        (crc,) = _CRC.unpack_from(mv, pstart + plen)
        if zlib.crc32(mv[:pstart + plen]) != crc:
            raise ChecksumError("blob checksum mismatch: corrupted in storage or transit")
    raw = bytes(mv[_PREFIX.size:off])
    check_depth(raw, MAX_HEADER_DEPTH)
    try:
        hdr = json.loads(raw)
        codec = hdr["codec"]
        params = hdr["params"]
        shape = tuple(hdr["shape"])
        dtype = hdr["dtype"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptBlobError(f"unreadable blob header: {str(exc)[:200]}") from None
    if not isinstance(codec, str) or not isinstance(params, dict):
        raise CorruptBlobError("blob header: codec must be a string and params an object")
    if (len(shape) != 5 or shape[1] != 2
            or not all(type(s) is int and 0 <= s <= MAX_DIM for s in shape)):
        raise CorruptBlobError(f"blob header: shape {short_repr(list(shape))} is not "
                               "[layers, 2, tokens, kv_heads, head_dim] of sizes below 2**31")
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS:
        raise CorruptBlobError(f"blob header: shape {list(shape)} has {elements} elements, "
                               f"more than the {MAX_ELEMENTS} any blob may hold")
    if elements > MAX_ELEMENTS_PER_BYTE * plen:
        raise CorruptBlobError(f"blob header: shape {list(shape)} claims {elements} elements "
                               f"but its payload of {plen} B can hold at most "
                               f"{MAX_ELEMENTS_PER_BYTE * plen}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CorruptBlobError(f"blob header: unknown dtype {short_repr(dtype)}")
    history = _check_history(hdr.get("history", []))
    info = BlobInfo(codec=codec, params=params, shape=shape, dtype=dtype, payload_bytes=plen,
                    total_bytes=n, version=version, history=tuple(history))
    return info, mv[pstart:pstart + plen]


def _check_history(history: Any) -> list[str]:
    if (not isinstance(history, list) or len(history) > MAX_HISTORY
            or not all(isinstance(h, str) and 0 < len(h) <= MAX_HISTORY_NAME
                       for h in history)):
        raise CorruptBlobError(f"blob header: history {short_repr(history)} is not a list of "
                               f"at most {MAX_HISTORY} method names")
    return history


def check_depth(raw: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it.

    ``json.loads`` recurses once per level, so a 64 KiB header of brackets would otherwise
    end in an untyped ``RecursionError``. Strings are blanked first (brackets inside them do
    not nest); on malformed JSON the count may be off, which the parser then reports.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return  # the common case, in a microsecond: too few brackets to nest that deep
    code = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = ((code == ord("[")) | (code == ord("{"))).astype(np.int32)
    step -= ((code == ord("]")) | (code == ord("}"))).astype(np.int32)
    if step.size and int(np.cumsum(step).max()) > limit:
        raise CorruptBlobError(f"blob header is nested more than {limit} levels deep")


def short_repr(value: Any, limit: int = 200) -> str:
    """repr of a header value for an error message, cut so a hostile header is not echoed."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def unpack(blob: bytes | bytearray | memoryview) -> tuple[BlobInfo, memoryview]:
    """Verify a blob and split it into its header and payload."""
    return _parse(blob, verify=True)


def peek_blob(blob: bytes | bytearray | memoryview, verify: bool = False) -> BlobInfo:
    """Read a blob's header without decoding it (checksum checked only when ``verify``)."""
    return _parse(blob, verify=verify)[0]
