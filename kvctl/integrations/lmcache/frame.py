"""The raw frame: how the serde stores a chunk the codecs do not take, bit-exactly.

MLA chunks (kv size 1), chunks of several kernel groups and fp8 (uint8) caches are not
``[layers, 2, tokens, heads, dim]`` floats, so they are stored as their own bytes, framed
like a codec blob so a reader can tell the two apart and a flipped bit is caught::

    magic    4 bytes  b"KVLR"
    version  u8       1
    reserved u8       0
    hdr_len  u16      length of the JSON header
    header   JSON     {"shapes": [[ints], ...], "dtypes": [str, ...]}
    pay_len  u64      payload length = sum of the groups' byte sizes
    payload  bytes    the groups' bytes, one after the other
    crc32    u32      zlib.crc32 of everything above

No pickle: a frame from a foreign file can at worst fail to parse.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

from kvctl.codecs.errors import (
    ChecksumError,
    CorruptBlobError,
    ForeignBlobError,
    TruncatedBlobError,
    UnsupportedVersionError,
)

MAGIC = b"KVLR"
VERSION = 1
_PREFIX = struct.Struct("<4sBBH")
_PAYLEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# Element sizes of the dtypes an LMCache L1 object may hold; anything else is refused.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1,
            "float8_e4m3fn": 1, "float8_e5m2": 1, "int32": 4, "int64": 8}
MAX_GROUPS = 64


@dataclass(frozen=True)
class FrameInfo:
    """What a raw frame holds."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    payload_bytes: int
    total_bytes: int

    @property
    def group_bytes(self) -> list[int]:
        return [math.prod(s) * ITEMSIZE[d] for s, d in zip(self.shapes, self.dtypes,
                                                            strict=True)]


def _header(shapes: list[list[int]], dtypes: list[str]) -> bytes:
    return json.dumps({"dtypes": dtypes, "shapes": shapes}, separators=(",", ":"),
                      sort_keys=True).encode()


def frame_size(shapes: list[list[int]], dtypes: list[str]) -> int:
    """Exact size of the frame of these groups (no data needed)."""
    payload = sum(math.prod(s) * ITEMSIZE[d] for s, d in zip(shapes, dtypes, strict=True))
    return _PREFIX.size + len(_header(shapes, dtypes)) + _PAYLEN.size + payload + _CRC.size


def pack_frame(shapes: list[list[int]], dtypes: list[str],
               payload: bytes | bytearray | memoryview) -> bytes:
    """Frame the groups' bytes."""
    for d in dtypes:
        if d not in ITEMSIZE:
            raise ValueError(f"raw frame: unsupported dtype {d!r}")
    data = memoryview(payload)
    if data.ndim != 1 or data.itemsize != 1:
        data = data.cast("B")  # any contiguous buffer, counted in bytes
    need = sum(math.prod(s) * ITEMSIZE[d] for s, d in zip(shapes, dtypes, strict=True))
    if data.nbytes != need:
        raise ValueError(f"raw frame: {data.nbytes} payload bytes, the groups need {need}")
    header = _header(shapes, dtypes)
    head = _PREFIX.pack(MAGIC, VERSION, 0, len(header)) + header
    paylen = _PAYLEN.pack(data.nbytes)
    crc = zlib.crc32(data, zlib.crc32(paylen, zlib.crc32(head)))
    return b"".join((head, paylen, data, _CRC.pack(crc)))


def is_frame(buf: bytes | bytearray | memoryview) -> bool:
    return bytes(memoryview(buf)[:4]) == MAGIC


def frame_extent(buf: bytes | bytearray | memoryview) -> int:
    """Length of the frame at the start of ``buf`` (which may carry padding after it)."""
    mv = memoryview(buf)
    if len(mv) < _PREFIX.size:
        raise TruncatedBlobError(f"raw frame is {len(mv)} bytes, shorter than its prefix")
    magic, version, _, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ForeignBlobError(f"not a kvctl raw frame (magic {magic!r})")
    if version != VERSION:
        raise UnsupportedVersionError(f"raw frame version {version}; this kvctl reads {VERSION}")
    off = _PREFIX.size + hlen
    if len(mv) < off + _PAYLEN.size:
        raise TruncatedBlobError("raw frame ends inside its header")
    (plen,) = _PAYLEN.unpack_from(mv, off)
    return off + _PAYLEN.size + plen + _CRC.size


def unpack_frame(buf: bytes | bytearray | memoryview, verify: bool = True
                 ) -> tuple[FrameInfo, memoryview]:
    """Check a frame (exactly its bytes, no trailing data) and split header from payload."""
    mv = memoryview(buf)
    n = frame_extent(mv)
    if len(mv) < n:
        raise TruncatedBlobError(f"raw frame is {len(mv)} bytes, its header says {n}")
    if len(mv) > n:
        raise CorruptBlobError(f"raw frame has {len(mv) - n} trailing bytes")
    _, _, _, hlen = _PREFIX.unpack_from(mv, 0)
    off = _PREFIX.size + hlen
    pstart = off + _PAYLEN.size
    plen = n - pstart - _CRC.size
    if verify:
        (crc,) = _CRC.unpack_from(mv, pstart + plen)
        if zlib.crc32(mv[:pstart + plen]) != crc:
            raise ChecksumError("raw frame checksum mismatch: corrupted in storage or transit")
    try:
        hdr = json.loads(bytes(mv[_PREFIX.size:off]))
        shapes = tuple(tuple(int(x) for x in s) for s in hdr["shapes"])
        dtypes = tuple(str(d) for d in hdr["dtypes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlobError(f"unreadable raw frame header: {exc}") from None
    if (not shapes or len(shapes) != len(dtypes) or len(shapes) > MAX_GROUPS
            or any(d not in ITEMSIZE for d in dtypes)
            or any(x < 0 for s in shapes for x in s)):
        raise CorruptBlobError(f"raw frame header: bad groups {shapes} {dtypes}")
    info = FrameInfo(shapes=shapes, dtypes=dtypes, payload_bytes=plen, total_bytes=n)
    if sum(info.group_bytes) != plen:
        raise CorruptBlobError(f"raw frame payload is {plen} bytes, its groups need "
                               f"{sum(info.group_bytes)}")
    return info, mv[pstart:pstart + plen]


def chunk_extent(buf: bytes | bytearray | memoryview) -> int:
    """Length of the codec blob or raw frame at the start of ``buf``.

    A stock LMCache adapter may hand back a buffer longer than what was written (it pads
    to the size estimate); both formats carry their payload length, so the end is known.
    The codec blob's prefix is the documented ``kvctl.codecs.blob`` layout.
    """
    from kvctl.codecs.blob import MAGIC as BLOB_MAGIC

    mv = memoryview(buf)
    head = bytes(mv[:4])
    if head == MAGIC:
        return frame_extent(mv)
    if head != BLOB_MAGIC:
        raise ForeignBlobError(f"neither a kvctl codec blob nor a raw frame (magic {head!r})")
    if len(mv) < _PREFIX.size:
        raise TruncatedBlobError(f"blob is {len(mv)} bytes, shorter than its prefix")
    _, _, _, hlen = _PREFIX.unpack_from(mv, 0)
    off = _PREFIX.size + hlen
    if len(mv) < off + _PAYLEN.size:
        raise TruncatedBlobError("blob ends inside its header")
    (plen,) = _PAYLEN.unpack_from(mv, off)
    return off + _PAYLEN.size + plen + _CRC.size
