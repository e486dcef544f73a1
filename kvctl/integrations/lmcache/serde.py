"""kvctl codecs as LMCache serdes (``Serializer`` / ``Deserializer`` of LMCache 0.5.x).

Importing this module imports LMCache; ``register_serdes()`` adds one serde type per kvctl
method (``kvctl-cachegen``, ``kvctl-cachegen-compact``, ``kvctl-int8``, ...) to LMCache's
registry, so an L2 adapter's ``"serde": {"type": "kvctl-cachegen", "head_dim": 64}`` finds it.

What goes to L2 for one chunk:

* a kvctl codec blob (``kvctl.codecs``' self-describing, checksummed format) when the chunk
  is one group shaped ``[2, L, T, H*D]`` of fp16/bf16/fp32;
* otherwise (MLA's kv size 1, several kernel groups, fp8/uint8 caches) a raw frame
  (``frame.py``) holding its exact bytes, so such a store never fails.

The size estimate reserves L1 memory for every in-flight store, so it is kept tight: for a
fixed-size codec it is that codec's exact blob size; for ``cachegen``, whose size depends on
the data, it is the size of an ``int8`` blob of the chunk (about 52% of fp16). A cachegen
blob is typically a third of that; in the rare chunk where it is not, the serializer writes
the ``int8`` blob instead (a finer quantizer, so the chunk only gets more exact).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor
from lmcache.v1.distributed.serde.base import Deserializer, SerdeProcessor, Serializer
from lmcache.v1.distributed.serde.factory import (
    get_registered_serde_types,
    register_serde_factory,
)

from kvctl.codecs import (
    BaseCodec,
    available_methods,
    codec_for_method,
    decode_blob,
    peek_blob,
)
from kvctl.codecs.base import dtype_name, torch_dtype
from kvctl.codecs.errors import CorruptBlobError, TruncatedBlobError
from kvctl.common import calibration
from kvctl.common.calibration import load_profile
from kvctl.integrations.lmcache.frame import (
    chunk_extent,
    frame_size,
    is_frame,
    pack_frame,
    unpack_frame,
)
from kvctl.integrations.lmcache.layout import (
    codec_layout_ok,
    kvctl_shape,
    to_kvctl,
    to_lmcache,
)

if TYPE_CHECKING:
    from lmcache.v1.memory_management import MemoryObj

log = logging.getLogger("kvctl.lmcache")

SERDE_PREFIX = "kvctl-"
# Codecs whose blob size depends on the data; they fall back to FALLBACK_METHOD.
VARIABLE_SIZE = frozenset({"cachegen"})
FALLBACK_METHOD = "int8"
SERDE_OPTIONS = ("head_dim", "max_workers", "warmup")
MAX_WORKERS = 64
MAX_PROFILED = 64


def _groups(shapes: list[torch.Size], dtypes: list[torch.dtype]
            ) -> tuple[list[list[int]], list[str]]:
    return [[int(x) for x in s] for s in shapes], [dtype_name(d) for d in dtypes]


def _byte_view(obj: MemoryObj) -> np.ndarray:
    """The object's logical bytes as a flat uint8 array (no copy)."""
    t = obj.tensor
    if t is None:
        raise ValueError("kvctl serde: memory object has no tensor (invalidated)")
    return t.view(torch.uint8).reshape(-1).numpy()


class KvctlSerializer(Serializer):
    """Encodes one LMCache chunk with a kvctl method (see the module docstring)."""

    def __init__(self, method: str, head_dim: int) -> None:
        self.method = method
        self.head_dim = head_dim
        self.codec: BaseCodec = codec_for_method(method)
        self.fallback: BaseCodec | None = (
            codec_for_method(FALLBACK_METHOD) if self.codec.name in VARIABLE_SIZE else None)
        self._sizes: dict[tuple[Any, ...], int] = {}
        # (model name, layers) -> its (profiled) codec
        self._profiled: dict[tuple[str, int], BaseCodec] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ size estimate ----
    def uses_codec(self, shapes: list[list[int]], dtypes: list[str]) -> bool:
        return len(shapes) == 1 and codec_layout_ok(tuple(shapes[0]), dtypes[0], self.head_dim)

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        shapes, dtypes = _groups(layout_desc.shapes, layout_desc.dtypes)
        key = (tuple(map(tuple, shapes)), tuple(dtypes))
        with self._lock:
            size = self._sizes.get(key)
        if size is not None:
            return size
        if self.uses_codec(shapes, dtypes):
            # Fixed-size codecs write the same number of bytes for any data, so a zero
            # chunk measures it exactly (once per layout).
            bounding = self.fallback or self.codec
            zeros = torch.zeros(kvctl_shape(tuple(shapes[0]), self.head_dim),
                                dtype=torch_dtype(dtypes[0]))
            size = len(bounding.encode(zeros))
        else:
            size = frame_size(shapes, dtypes)
        with self._lock:
            self._sizes[key] = size
        return size

    # ---------------------------------------------------------------- serialize ----
    def codec_for(self, key: ObjectKey | None, layers: int) -> BaseCodec:
        """The codec for a chunk of ``layers`` layers of this key's model: with the model's
        step profile when kvctl has one (committed or calibrated before; the serde never
        loads a model to calibrate) and it covers exactly those layers. The profile scales
        whole layers and cachegen's steps follow each (layer, head)'s own statistics, so a
        tensor-parallel rank's shard (some heads, every layer) is quantized exactly as in
        the full chunk; a pipeline stage's (some layers: which ones, the key does not say)
        gets equal steps."""
        if not getattr(self.codec, "takes_profile", False) or key is None:
            return self.codec
        name = str(key.model_name)
        with self._lock:
            codec = self._profiled.get((name, layers))
        if codec is not None:
            return codec
        profile = load_profile(name)
        if profile is None and "/" in name:  # LMCache names hub ids: org/model
            profile = load_profile(name.rsplit("/", 1)[-1])
        codec = self.codec
        if profile is not None and profile.layers == layers:
            codec = calibration.codec_for(self.method, profile)
        with self._lock:
            if len(self._profiled) >= MAX_PROFILED:  # names come from keys: stay bounded
                self._profiled.clear()
            self._profiled[(name, layers)] = codec
        return codec

    def encode_chunk(self, chunk: torch.Tensor, key: ObjectKey | None = None,
                     capacity: int | None = None) -> bytes:
        """The bytes stored for one single-group chunk ``[2, L, T, H*D]``."""
        shapes, dtypes = _groups([chunk.shape], [chunk.dtype])
        if not self.uses_codec(shapes, dtypes):
            return pack_frame(shapes, dtypes, chunk.contiguous().view(torch.uint8)
                              .reshape(-1).numpy())
        kv = to_kvctl(chunk, self.head_dim)
        # inf/nan raise NonFiniteInputError here (every lossy codec refuses them): the
        # store fails, LMCache logs it and the chunk stays in L1 only.
        blob = self.codec_for(key, kv.shape[0]).encode(kv)
        if self.fallback is not None and capacity is not None and len(blob) > capacity:
            log.info("kvctl serde: a %s blob of %d bytes exceeds the %d reserved; storing "
                     "this chunk with %s", self.method, len(blob), capacity, FALLBACK_METHOD)
            blob = self.fallback.encode(kv)
        return blob

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> int:
        out = _byte_view(dst)
        shapes, dtypes = _groups(src.get_shapes(), src.get_dtypes())
        if self.uses_codec(shapes, dtypes):
            blob = self.encode_chunk(src.tensor, key, capacity=out.size)
        else:
            blob = pack_frame(shapes, dtypes, src.byte_array)
        n = len(blob)
        if n > out.size:
            raise ValueError(f"kvctl serde: {n}-byte blob exceeds its {out.size}-byte buffer")
        out[:n] = np.frombuffer(blob, dtype=np.uint8)
        return n


class KvctlDeserializer(Deserializer):
    """Decodes what ``KvctlSerializer`` wrote (any kvctl blob, or a raw frame)."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> None:
        buf = _byte_view(src)
        n = chunk_extent(buf)
        if n > buf.size:
            raise TruncatedBlobError(f"stored chunk is {buf.size} bytes, its header says {n}")
        data = memoryview(buf[:n])
        shapes, dtypes = _groups(dst.get_shapes(), dst.get_dtypes())
        if is_frame(data):
            info, payload = unpack_frame(data)
            if [list(s) for s in info.shapes] != shapes or list(info.dtypes) != dtypes:
                raise CorruptBlobError(f"stored raw chunk {info.shapes} {info.dtypes} does "
                                       f"not fit the destination {shapes} {dtypes}")
            target = _raw_view(dst)
            target[:] = np.frombuffer(payload, dtype=np.uint8)
            return
        self.decode_into(data, dst.tensor)

    def decode_into(self, blob: memoryview | bytes, out: torch.Tensor) -> None:
        """Decode a codec blob into an LMCache chunk tensor ``[2, L, T, H*D]``."""
        info = peek_blob(blob)
        want = kvctl_shape(tuple(out.shape), self.head_dim) if out.dim() == 4 else None
        if want is None or info.shape != want or info.dtype != dtype_name(out.dtype):
            raise CorruptBlobError(f"stored chunk {list(info.shape)} {info.dtype} does not fit "
                                   f"the destination {list(out.shape)} {out.dtype} "
                                   f"(head_dim {self.head_dim})")
        out.copy_(to_lmcache(decode_blob(blob)))


def _raw_view(obj: MemoryObj) -> np.ndarray:
    """All groups' bytes of a (possibly multi-group) object, writable, no copy."""
    return np.frombuffer(obj.byte_array, dtype=np.uint8)


def warm_up(ser: KvctlSerializer, de: KvctlDeserializer) -> None:
    """Run each path once on a small chunk so the first real store does not pay numba's JIT."""
    gen = torch.Generator().manual_seed(0)
    chunk = torch.randn((2, 2, 16, 2 * ser.head_dim), generator=gen).to(torch.bfloat16)
    for codec in filter(None, (ser.codec, ser.fallback)):
        blob = codec.encode(to_kvctl(chunk, ser.head_dim))
        de.decode_into(memoryview(blob), torch.empty_like(chunk))


def _parse_options(serde_type: str, kwargs: dict[str, object]) -> tuple[int, int, bool]:
    unknown = sorted(set(kwargs) - set(SERDE_OPTIONS))
    if unknown:
        raise ValueError(f"{serde_type} serde: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SERDE_OPTIONS)}")
    head_dim = kwargs.get("head_dim")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 0 < head_dim <= 4096:
        raise ValueError(f"{serde_type} serde: set \"head_dim\" to the model's attention head "
                         f"size, an integer such as 64 (SmolLM2-135M) or 128 (Llama-3-8B); "
                         f"got {head_dim!r}")
    workers = kwargs.get("max_workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 < workers <= MAX_WORKERS:
        raise ValueError(f"{serde_type} serde: \"max_workers\" must be an integer from 1 to "
                         f"{MAX_WORKERS}; got {workers!r}")
    warm = kwargs.get("warmup", True)
    if not isinstance(warm, bool):
        raise ValueError(f"{serde_type} serde: \"warmup\" must be true or false; got {warm!r}")
    return head_dim, workers, warm


def make_serde(method: str, kwargs: dict[str, object]) -> SerdeProcessor:
    """Build the LMCache serde processor of one kvctl method from its JSON options."""
    head_dim, workers, warm = _parse_options(SERDE_PREFIX + method, kwargs)
    ser = KvctlSerializer(method, head_dim)
    de = KvctlDeserializer(head_dim)
    if warm:
        warm_up(ser, de)
    return AsyncSerdeProcessor(ser, de, max_workers=workers)


def register_serdes() -> list[str]:
    """Register ``kvctl-<method>`` for every kvctl method; returns the names (idempotent)."""
    names = []
    known = set(get_registered_serde_types())
    for method in available_methods():
        name = SERDE_PREFIX + method
        names.append(name)
        if name not in known:
            register_serde_factory(name, lambda kw, m=method: make_serde(m, kw))
    return names


__all__ = [
    "FALLBACK_METHOD",
    "SERDE_PREFIX",
    "KvctlDeserializer",
    "KvctlSerializer",
    "make_serde",
    "register_serdes",
    "warm_up",
]
