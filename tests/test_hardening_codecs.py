"""Hostile blobs: a valid checksum buys nothing. Work and memory stay bounded by the payload.

A checksum is not a defence (anyone can recompute it), so every blob here is forged with a
correct CRC and must still fail fast with a typed ``BlobError`` before the decoder allocates
what its header claims.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from kvctl.codecs import (
    BlobError,
    CorruptBlobError,
    available_codecs,
    available_methods,
    codec_for_method,
    decode_blob,
    get_codec,
    peek_blob,
)
from kvctl.codecs import blob as blobmod
from kvctl.codecs.blob import FORMAT_VERSION, pack, unpack
from kvctl.codecs.rans import Bank

METHODS = available_methods()


def forge(header: bytes, payload: bytes) -> bytes:
    """A blob with an arbitrary header and a correct checksum (what an attacker can write)."""
    head = struct.pack("<4sBBH", b"KVZ1", FORMAT_VERSION, 0, len(header)) + header
    body = head + struct.pack("<Q", len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def reshaped(blob: bytes, shape: tuple[int, ...]) -> bytes:
    """The same payload and params under a different shape, re-checksummed."""
    info, payload = unpack(blob)
    return pack(info.codec, info.params, shape, info.dtype, bytes(payload))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn) -> tuple[int, BaseException | None]:
    """Peak memory ``fn`` costs: the larger of what tracemalloc sees (Python and numpy
    allocations) and the growth of the process's peak RSS, which also counts what torch and
    numba allocate behind tracemalloc's back (Linux: writing 5 to clear_refs resets VmHWM).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kib("VmRSS")
    tracemalloc.start()
    tracemalloc.reset_peak()
    err: BaseException | None = None
    try:
        fn()
    except BaseException as exc:  # the caller asserts on the type
        err = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return max(peak, 1024 * (_status_kib("VmHWM") - rss0)), err


def small_blob(method: str) -> bytes:
    kv = torch.randn(2, 2, 8, 2, 16, generator=torch.Generator().manual_seed(1)).half()
    return codec_for_method(method).encode(kv)


def test_issue_bomb_2_30_tokens_in_a_tiny_blob_fails_before_allocating():
    # The report's case: a cachegen blob of ~190 bytes, valid CRC, claiming 2**30 tokens.
    small = get_codec("cachegen").encode(torch.randn(1, 2, 4, 1, 1).half())
    bomb = reshaped(small, (1, 2, 1 << 30, 1, 1))
    assert len(bomb) < 400
    peak, err = peak_bytes(lambda: decode_blob(bomb))
    assert isinstance(err, BlobError), err
    assert "claims" in str(err)
    # what the header claims would be gigabytes; the slack absorbs other threads of the
    # test process (peak RSS is process-wide)
    assert peak < 8 * 1024 * 1024, peak
    # peek_blob (which the server uses to read token counts) refuses it too
    with pytest.raises(CorruptBlobError):
        peek_blob(bomb)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factor", [2, 1000, 1 << 20])
def test_any_codec_with_inflated_token_count_is_refused_cheaply(method, factor):
    blob = small_blob(method)
    baseline, err = peak_bytes(lambda: decode_blob(blob))  # also warms the codec up
    assert err is None
    info = peek_blob(blob)
    L, _, T, H, D = info.shape
    forged = reshaped(blob, (L, 2, T * factor, H, D))
    claimed = info.num_elements * factor
    admitted = claimed <= codec_for_method(method).max_elements_per_byte * info.payload_bytes
    peak, err = peak_bytes(lambda: decode_blob(forged))
    assert isinstance(err, BlobError), repr(err)
    if not admitted:
        assert "claims" in str(err)
    # A claim the payload could hold may cost what a real blob of that shape costs; one it
    # could not is refused before any of it is allocated.
    out_bytes = 2 * claimed if admitted else 0
    # 4 MiB of slack for other threads of the test process (peak RSS is process-wide); the
    # largest refused claim here is a gigabyte
    assert peak <= baseline + 10 * (len(forged) + out_bytes) + 4 * 1024 * 1024, (
        peak, baseline, len(forged))


@pytest.mark.parametrize("dims", [
    (1 << 34, 2, 1, 1, 1),      # more than MAX_ELEMENTS
    (1, 2, 1 << 31, 1, 1),      # a dimension past 2**31
    (0, 2, 1 << 80, 1, 1),      # zero elements but an absurd dimension
    (True, 2, 1, 1, 1),         # booleans are not sizes
])
def test_absurd_shapes_are_refused(dims):
    header = json.dumps({"codec": "raw", "params": {}, "shape": list(dims),
                         "dtype": "float16"}).encode()
    with pytest.raises(CorruptBlobError):
        decode_blob(forge(header, b"\0" * 4))


@pytest.mark.parametrize("depth", [100, 3000, 30000])
def test_deeply_nested_header_is_a_typed_error_not_recursion(depth):
    header = (b'{"codec":"raw","params":{"x":' + b"[" * depth + b"]" * depth
              + b'},"shape":[1,2,1,1,1],"dtype":"float16"}')
    if len(header) > 0xFFFF:
        header = b"[" * 0xFFFF  # the most a u16 header length allows
    blob = forge(header, b"\0" * 4)
    with pytest.raises(CorruptBlobError, match="nested"):
        decode_blob(blob)
    with pytest.raises(CorruptBlobError, match="nested"):
        peek_blob(blob)


def test_brackets_inside_header_strings_do_not_count_as_nesting():
    # a level name full of brackets: refused as a bad level, not as nesting
    header = json.dumps({"codec": "cachegen", "params": {"level": "[{" * 40 + '\\"'},
                         "shape": [1, 2, 1, 1, 1], "dtype": "float16"}).encode()
    with pytest.raises(CorruptBlobError) as info:
        decode_blob(forge(header, b"\0" * 64))
    assert "nested" not in str(info.value)
    assert "level" in str(info.value)


def test_unterminated_header_string_is_a_typed_error():
    # '"\"\"\"...' never closes (with a mandatory closing quote the depth scan's string
    # regex would rescan from every quote: minutes instead of microseconds)
    header = b'"' + b'\\"' * 30000
    with pytest.raises(CorruptBlobError, match="unreadable"):
        decode_blob(forge(header, b""))


def test_errors_do_not_echo_a_hostile_header():
    header = json.dumps({"codec": "x" * 50_000, "params": {}, "shape": [1, 2, 1, 1, 1],
                         "dtype": "float16"}).encode()
    with pytest.raises(CorruptBlobError) as info:
        decode_blob(forge(header, b"\0" * 4))
    assert len(str(info.value)) < 500
    header = json.dumps({"codec": "kivi", "params": {"bits": "y" * 50_000},
                         "shape": [1, 2, 1, 1, 1], "dtype": "float16"}).encode()
    with pytest.raises(CorruptBlobError) as info:
        decode_blob(forge(header, b"\0" * 4))
    assert len(str(info.value)) < 700


# ------------------------------------------------------------- the bound is not too tight ----
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 2, 4096, 1, 4), (1, 2, 20000, 1, 1), (1, 2, 1, 1, 1)])
@pytest.mark.parametrize("fill", [0.0, 3.0])
def test_most_compressible_inputs_still_decode(method, shape, fill):
    """Constant KV is the best case of every codec; its blob must stay under the bound."""
    codec = codec_for_method(method)
    kv = torch.full(shape, fill, dtype=torch.float16)
    blob = codec.encode(kv)
    info = peek_blob(blob)
    assert info.num_elements <= codec.max_elements_per_byte * info.payload_bytes
    out = decode_blob(blob)
    assert out.shape == kv.shape


def test_every_codec_bound_fits_the_container_bound():
    for name in available_codecs():
        assert get_codec(name).max_elements_per_byte <= blobmod.MAX_ELEMENTS_PER_BYTE
    assert get_codec("kivi", bits=1).max_elements_per_byte <= blobmod.MAX_ELEMENTS_PER_BYTE


def test_rans_bound_holds_for_the_densest_possible_stream():
    """All symbols at the centre of the narrowest table is the cheapest stream the coder can
    write; its symbols per byte must not exceed the bound (and the bound is not loose)."""
    from kvctl.codecs.rans import elements_per_byte

    bank = Bank(64, 31)
    table = int(np.argmax(bank.freq[:, 31]))
    n = 200_000
    sym = np.full((1, n, 4), 31, dtype=np.uint8)
    ctx = np.full((1, 4), table, dtype=np.uint8)
    words = bank.encode(sym, ctx)
    per_byte = sym.size / (2 * words.size)
    bound = elements_per_byte(64)
    assert per_byte <= bound
    assert per_byte > 0.9 * bound, (per_byte, bound)
    assert np.array_equal(bank.decode(words, sym.shape, ctx), sym)
