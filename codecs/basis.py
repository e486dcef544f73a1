"""Decorrelating bases for the transform codec (``kvtc``): data, named by a content hash.

A basis holds, per (layer, K/V), the mean of the model's KV over channels (``heads x
head_dim``) and the eigenvectors of its covariance, strongest first, learned once from
calibration KV (``kvctl.common.transform``). Blobs name the basis they were coded with by
``basis.id``, a hash of exactly the bytes a decoder uses (means and vectors), so two
processes that agree on the id agree on the numbers; one that lacks it raises
``MissingBasisError`` naming it, it never decodes with another.

File format (little endian, never pickle)::

    magic    4 bytes  b"KVB2"
    hdr_len  u32      length of the JSON header
    header   JSON     {"model", "key", "layers", "channels", "id", "meta": {...}}
    mean     float32  [layers, 2, channels]
    vectors  float16  [layers, 2, channels, channels]  (column j = component j)
    weight   float32  [layers, 2, channels]  (each component's step multiplier)
    scale    float32  [layers, 2, channels]  (the components' calibration std)
    digest   32 bytes blake2b of everything above

``weight`` spreads a (layer, K/V)'s bits over its components by what the model's output
reads of them (``kvctl.common.transform``: the diagonal Fisher information of the
next-token distribution in the basis), geometric mean 1 per (layer, K/V); it is part of the
id, since a decoder multiplies by it.

``meta`` is for the encoder only (step multipliers per level); it is not part of the id.
Files are found by id in the committed folder (``codecs/bases/``), in folders added with
``add_basis_dir`` and under kvctl's cache folder; ``register_basis`` adds one in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvctl.codecs.errors import CorruptBlobError, InvalidParamsError, MissingBasisError

if TYPE_CHECKING:
    import torch

MAGIC = b"KVB2"
COMMITTED = Path(__file__).resolve().parent / "bases"
_ID = re.compile(r"^kvb-[0-9a-f]{16}$")
MAX_CHANNELS = 4096
MAX_LAYERS = 1024


@dataclass(frozen=True, eq=False)
class Basis:
    """One model's bases. ``mean`` [L, 2, C] float32, ``vectors`` [L, 2, C, C] float16
    (orthonormal columns, strongest component first), ``scale`` [L, 2, C] float32,
    ``weight`` [L, 2, C] float32 (step multipliers; all ones when not given)."""

    model: str
    key: str
    mean: np.ndarray
    vectors: np.ndarray
    scale: np.ndarray
    weight: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _on_device: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> int:
        return int(self.mean.shape[0])

    @property
    def channels(self) -> int:
        return int(self.mean.shape[2])

    def __post_init__(self) -> None:
        if self.weight is None:
            object.__setattr__(self, "weight", np.ones_like(self.mean, dtype=np.float32))
        elif self.weight.shape != self.mean.shape or not (self.weight > 0).all():
            raise InvalidParamsError("a basis' weights are positive, one per component")

    @property
    def id(self) -> str:
        return content_id(self.mean, self.vectors, self.weight)

    def tensors(self, device: Any) -> tuple[torch.Tensor, ...]:
        """(vectors [L, 2, C, C], their transpose (contiguous), mean [L, 2, 1, C], the mean
        in coefficients [L, 2, 1, C], weight [L, 2, 1, C]), float32 on ``device``, made once
        per device."""
        import torch

        dev = str(torch.device(device))
        cache = self._on_device
        if dev not in cache:
            u = torch.from_numpy(orthonormal(self.vectors)).to(dev)
            m = torch.from_numpy(self.mean.copy()).to(dev).unsqueeze(2)
            w = torch.from_numpy(np.asarray(self.weight, np.float32).copy()).to(dev)
            cache[dev] = (u, u.transpose(-1, -2).contiguous(), m, torch.matmul(m, u),
                          w.unsqueeze(2))
        return cache[dev]

    def to_bytes(self) -> bytes:
        header = json.dumps({"model": self.model, "key": self.key, "layers": self.layers,
                             "channels": self.channels, "id": self.id, "meta": self.meta},
                            sort_keys=True, separators=(",", ":")).encode()
        body = b"".join((MAGIC, struct.pack("<I", len(header)), header,
                         self.mean.astype("<f4").tobytes(),
                         self.vectors.astype("<f2").tobytes(),
                         np.asarray(self.weight).astype("<f4").tobytes(),
                         self.scale.astype("<f4").tobytes()))
        return body + hashlib.blake2b(body, digest_size=32).digest()


def orthonormal(vectors: np.ndarray) -> np.ndarray:
    """The fp16-stored vectors made orthonormal again (polar factor, in float64): a
    rotation that is off by fp16 rounding (1e-3) would move a re-encoded coefficient by a
    sizeable part of a step, and re-encoding must find the symbols it came from."""
    u = vectors.astype(np.float64)
    g = np.swapaxes(u, -1, -2) @ u
    w, v = np.linalg.eigh(g)
    inv_sqrt = (v * (1.0 / np.sqrt(np.maximum(w, 1e-12)))[..., None, :]) @ np.swapaxes(v, -1, -2)
    return (u @ inv_sqrt).astype(np.float32)


def content_id(mean: np.ndarray, vectors: np.ndarray, weight: np.ndarray) -> str:
    """``kvb-`` + 16 hex digits of blake2b over the shape, means, vectors and weights."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<III", *vectors.shape[:1], vectors.shape[2], 3))
    h.update(np.ascontiguousarray(mean, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(vectors, dtype="<f2").tobytes())
    h.update(np.ascontiguousarray(weight, dtype="<f4").tobytes())
    return "kvb-" + h.hexdigest()


def from_bytes(data: bytes, where: str = "basis") -> Basis:
    """Parse and verify a basis file; any inconsistency is a ``CorruptBlobError``."""
    if len(data) < 40 or data[:4] != MAGIC:
        raise CorruptBlobError(f"{where}: not a kvctl basis file")
    body, digest = data[:-32], data[-32:]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        raise CorruptBlobError(f"{where}: checksum mismatch")
    (hlen,) = struct.unpack_from("<I", body, 4)
    try:
        hdr = json.loads(body[8:8 + hlen])
        L, C = int(hdr["layers"]), int(hdr["channels"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlobError(f"{where}: unreadable header: {exc}") from None
    if not (1 <= L <= MAX_LAYERS and 1 <= C <= MAX_CHANNELS):
        raise CorruptBlobError(f"{where}: {L} layers x {C} channels out of range")
    off = 8 + hlen
    sizes = (4 * L * 2 * C, 2 * L * 2 * C * C, 4 * L * 2 * C, 4 * L * 2 * C)
    if len(body) != off + sum(sizes):
        raise CorruptBlobError(f"{where}: {len(body)} bytes, the header says "
                               f"{off + sum(sizes)}")
    mean = np.frombuffer(body, "<f4", L * 2 * C, off).reshape(L, 2, C).astype(np.float32)
    off += sizes[0]
    vec = np.frombuffer(body, "<f2", L * 2 * C * C, off).reshape(L, 2, C, C).copy()
    off += sizes[1]
    weight = np.frombuffer(body, "<f4", L * 2 * C, off).reshape(L, 2, C).astype(np.float32)
    off += sizes[2]
    scale = np.frombuffer(body, "<f4", L * 2 * C, off).reshape(L, 2, C).astype(np.float32)
    if not (np.isfinite(weight).all() and (weight > 0).all()):
        raise CorruptBlobError(f"{where}: a component weight is not a positive number")
    b = Basis(model=str(hdr.get("model", "")), key=str(hdr.get("key", "")), mean=mean,
              vectors=vec, scale=scale, weight=weight, meta=dict(hdr.get("meta") or {}))
    if hdr.get("id") != b.id:
        raise CorruptBlobError(f"{where}: content does not match its id {hdr.get('id')!r}")
    return b


# --------------------------------------------------------------------- store ----
_LOCK = threading.Lock()
_BY_ID: dict[str, Basis] = {}
_DIRS: list[Path] = []


def check_id(basis_id: Any) -> str:
    if not isinstance(basis_id, str) or not _ID.match(basis_id):
        raise InvalidParamsError(f"a basis is named kvb- and 16 hex digits, got "
                                 f"{str(basis_id)[:40]!r}")
    return basis_id


def register_basis(basis: Basis) -> str:
    """Make ``basis`` findable by its id in this process; returns the id."""
    with _LOCK:
        _BY_ID[basis.id] = basis
    return basis.id


def add_basis_dir(path: Path) -> None:
    """Search ``path`` (``*.kvb`` files named ``...-<id>.kvb``) for bases by id."""
    p = Path(path)
    with _LOCK:
        if p not in _DIRS:
            _DIRS.append(p)


def basis_dirs() -> list[Path]:
    """Committed bases first, then added folders, then ``$KVCTL_BASIS_DIR``."""
    extra = [Path(d) for d in os.environ.get("KVCTL_BASIS_DIR", "").split(os.pathsep) if d]
    try:  # kvctl's cache folder, where bases calibrated on this machine are kept
        from kvctl.common.paths import cache_root

        extra.append(cache_root() / "bases")
    except ImportError:  # pragma: no cover - the codec library used on its own
        pass
    with _LOCK:
        return [COMMITTED, *_DIRS, *extra]


def file_name(model: str, basis_id: str) -> str:
    """A basis file's name: readable model part, unique through the id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[:80].strip("._") or "model"
    return f"{safe}-{basis_id}.kvb"


def find_basis(basis_id: str) -> Basis:
    """The basis named ``basis_id``, from memory or a basis folder; ``MissingBasisError``
    (naming the id and the folders searched) when no verified copy exists."""
    check_id(basis_id)
    with _LOCK:
        hit = _BY_ID.get(basis_id)
    if hit is not None:
        return hit
    dirs = basis_dirs()
    for d in dirs:
        for path in sorted(d.glob(f"*-{basis_id}.kvb")) if d.is_dir() else ():
            try:
                b = from_bytes(path.read_bytes(), str(path))
            except (OSError, CorruptBlobError):
                continue  # a damaged copy is no copy; another folder may hold a good one
            if b.id == basis_id:
                return _BY_ID.setdefault(basis_id, b)
    raise MissingBasisError(
        f"basis {basis_id} is not on this machine (searched {', '.join(map(str, dirs))}); "
        "copy its .kvb file there or calibrate the model (kvctl bench --model ...)",
        basis=basis_id)
