"""The self-describing blob container every codec writes.

Layout (little endian)::

    magic      4 bytes  b"KVZ1"
    version    u8       FORMAT_VERSION
    reserved   u8       0
    hdr_len    u16      length of the JSON header
    header     JSON     {"codec": str, "params": {...}, "shape": [5 ints], "dtype": str}
    pay_len    u64      length of the payload
    payload    bytes    codec specific
    crc32      u32      zlib.crc32 of everything above

JSON rather than pickle: a blob from an untrusted store can at worst fail to parse. The
checksum is checked before the header is trusted, so a flipped bit anywhere is reported as
a ``ChecksumError`` instead of being decoded into plausible garbage.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

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
# A header may not claim more elements than this: guards decoders against memory bombs.
MAX_ELEMENTS = 1 << 34


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
         payload: bytes | bytearray | memoryview) -> bytes:
    """Wrap a codec payload into a checksummed blob."""
    header = json.dumps({"codec": codec, "params": params, "shape": list(shape),
                         "dtype": dtype}, separators=(",", ":"), sort_keys=True).encode()
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
    try:
        hdr = json.loads(bytes(mv[_PREFIX.size:off]))
        codec = hdr["codec"]
        params = hdr["params"]
        shape = tuple(hdr["shape"])
        dtype = hdr["dtype"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlobError(f"unreadable blob header: {exc}") from None
    if not isinstance(codec, str) or not isinstance(params, dict):
        raise CorruptBlobError("blob header: codec must be a string and params an object")
    if (len(shape) != 5 or not all(isinstance(s, int) and s >= 0 for s in shape)
            or shape[1] != 2):
        raise CorruptBlobError(f"blob header: shape {list(shape)} is not "
                               "[layers, 2, tokens, kv_heads, head_dim]")
    if math.prod(shape) > MAX_ELEMENTS:
        raise CorruptBlobError(f"blob header: shape {list(shape)} is implausibly large")
    if dtype not in DTYPES:
        raise CorruptBlobError(f"blob header: unknown dtype {dtype!r}")
    info = BlobInfo(codec=codec, params=params, shape=shape, dtype=dtype, payload_bytes=plen,
                    total_bytes=n, version=version)
    return info, mv[pstart:pstart + plen]


def unpack(blob: bytes | bytearray | memoryview) -> tuple[BlobInfo, memoryview]:
    """Verify a blob and split it into its header and payload."""
    return _parse(blob, verify=True)


def peek_blob(blob: bytes | bytearray | memoryview, verify: bool = False) -> BlobInfo:
    """Read a blob's header without decoding it (checksum checked only when ``verify``)."""
    return _parse(blob, verify=verify)[0]
