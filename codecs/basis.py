"""Transforms for the transform codec (``kvtc``): data, named by a content hash.

A basis holds, per (layer, K/V), what the encoder applies to a token's KV vector (all
``heads x head_dim`` channels at once) before quantizing, learned once from calibration KV
(``kvctl.common.transform``):

* ``rope``: the model's rotary embedding (neox layout, one base per layer). Keys are coded
  *before* their rotation: a token's rotation depends on its position, so post-RoPE keys
  of one content spread over every angle and decorrelate badly; pre-RoPE keys of a model
  share a low-dimensional subspace. The blob carries the chunk's first position.
* ``mean`` and ``encoder`` (``A``): coefficients ``y = (x - mean) @ A``. ``A`` whitens the
  channels by the model's output sensitivity (the square root of the Fisher information
  of the next-token distribution, shrunk toward its diagonal's mean) and then rotates
  onto the principal axes of the weighted KV, so one uniform step everywhere is the
  rate-distortion allocation for the model's output, across components and layers.
  The decoder uses ``A``'s inverse, computed in float64 from the stored float32 ``A``.
* ``unit``: the RMS of the calibration coefficients; a level's step is in these units.
* ``predictor``: a linear estimate, from a token's own key (pre-RoPE, centred) and the log
  of its value norm, of the log of how much the output reads that token (its summed Fisher
  information). Attention is sparse and the tokens it reads are largely recognisable by
  their keys, so the encoder gives those finer steps and the rest coarser ones; the steps
  travel in the blob, so this part is the encoder's alone.
* ``scale``: the calibration coefficients' standard deviations (informative).

Blobs name the basis they were coded with by ``basis.id``, a hash of everything but
``meta``, so two processes that agree on the id agree on the numbers; one that lacks it
raises ``MissingBasisError`` naming it, it never decodes with another.

File format (little endian, never pickle)::

    magic     4 bytes  b"KVB3"
    hdr_len   u32      length of the JSON header
    header    JSON     {"model", "key", "layers", "channels", "id", "unit", "rope", "meta"}
    mean      float32  [layers, 2, channels]
    encoder   float32  [layers, 2, channels, channels]
    scale     float32  [layers, 2, channels]
    predictor float32  [layers, 2, channels + 1]
    digest    32 bytes blake2b of everything above

``rope`` is ``null`` or ``{"head_dim": D, "base": [one per layer]}``. Files are found by id
in the committed folder (``codecs/bases/``), in folders added with ``add_basis_dir`` and
under kvctl's cache folder; ``register_basis`` adds one in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvctl.codecs.errors import CorruptBlobError, InvalidParamsError, MissingBasisError

MAGIC = b"KVB3"
COMMITTED = Path(__file__).resolve().parent / "bases"
_ID = re.compile(r"^kvb-[0-9a-f]{16}$")
MAX_CHANNELS = 4096
MAX_LAYERS = 1024
# an encoder whose inverse is this ill-conditioned is refused: decoding would amplify
# fp16 rounding into visible error
MAX_CONDITION = 1e6


def check_rope(rope: Any, layers: int, channels: int) -> dict[str, Any] | None:
    """``rope`` as a plain dict, or ``InvalidParamsError`` saying what is wrong with it."""
    if rope is None:
        return None
    try:
        d = int(rope["head_dim"])
        base = [float(b) for b in rope["base"]]
    except (KeyError, TypeError, ValueError):
        raise InvalidParamsError("a basis' rope is {head_dim, base: [one per layer]}") from None
    if d < 2 or d % 2 or channels % d or len(base) != layers or not all(
            math.isfinite(b) and b > 1 for b in base):
        raise InvalidParamsError(f"rope head_dim {d} / {len(base)} bases do not fit "
                                 f"{layers} layers x {channels} channels")
    return {"head_dim": d, "base": base}


def rope_frequencies(rope: dict[str, Any] | None) -> Any:
    """Inverse frequencies ``[L, D/2]`` float64 (CPU) of a checked ``rope``, or ``None``."""
    import torch

    if rope is None:
        return None
    d = rope["head_dim"]
    base = torch.tensor(rope["base"], dtype=torch.float64).view(-1, 1)
    return base.pow(-torch.arange(0, d, 2, dtype=torch.float64) / d)


@dataclass(frozen=True, eq=False)
class Basis:
    """One model's transforms. ``mean`` [L, 2, C], ``encoder`` [L, 2, C, C], ``scale``
    [L, 2, C], ``predictor`` [L, 2, C + 1] (zeros: every token alike), float32."""

    model: str
    key: str
    mean: np.ndarray
    encoder: np.ndarray
    scale: np.ndarray
    unit: float = 1.0
    rope: dict[str, Any] | None = None
    predictor: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _on_device: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> int:
        return int(self.mean.shape[0])

    @property
    def channels(self) -> int:
        return int(self.mean.shape[2])

    def __post_init__(self) -> None:
        L, C = self.layers, self.channels
        set_ = object.__setattr__
        set_(self, "mean", np.ascontiguousarray(self.mean, np.float32))
        set_(self, "encoder", np.ascontiguousarray(self.encoder, np.float32))
        set_(self, "scale", np.ascontiguousarray(self.scale, np.float32))
        if self.predictor is None:
            set_(self, "predictor", np.zeros((L, 2, C + 1), np.float32))
        set_(self, "predictor", np.ascontiguousarray(self.predictor, np.float32))
        if (self.mean.shape != (L, 2, C) or self.encoder.shape != (L, 2, C, C)
                or self.scale.shape != (L, 2, C) or self.predictor.shape != (L, 2, C + 1)):
            raise InvalidParamsError("a basis' arrays disagree on layers and channels")
        if not (math.isfinite(self.unit) and self.unit > 0):
            raise InvalidParamsError("a basis' unit is a positive number")
        for a in (self.mean, self.encoder, self.scale, self.predictor):
            if not np.isfinite(a).all():
                raise InvalidParamsError("a basis holds a non-finite number")
        cond = np.linalg.cond(self.encoder.astype(np.float64))
        if not (np.isfinite(cond).all() and cond.max() <= MAX_CONDITION):
            raise InvalidParamsError(f"a basis' encoder is singular or too ill-conditioned "
                                     f"(condition {float(np.nanmax(cond)):.3g})")
        set_(self, "rope", check_rope(self.rope, L, C))

    @property
    def id(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(MAGIC + struct.pack("<II", self.layers, self.channels))
        h.update(json.dumps({"unit": self.unit, "rope": self.rope}, sort_keys=True).encode())
        for a in (self.mean, self.encoder, self.scale, self.predictor):
            h.update(a.astype("<f4").tobytes())
        return "kvb-" + h.hexdigest()

    def tensors(self, device: Any) -> tuple[Any, ...]:
        """(encoder [L, 2, C, C], its inverse, mean [L, 2, 1, C], predictor [L, 2, C + 1],
        rope inverse frequencies [L, D/2] float64 or None), float32 on ``device``, made
        once per device."""
        import torch

        dev = str(torch.device(device))
        cache = self._on_device
        if dev not in cache:
            a = torch.from_numpy(self.encoder.astype(np.float64))
            # numpy's LAPACK, one matrix at a time: torch's batched float64 inverse failed
            # inside MKL (bad pivots) on a CI run while passing here
            inv = torch.from_numpy(np.stack([np.linalg.inv(m) for m in
                                             self.encoder.astype(np.float64).reshape(
                                                 -1, self.channels, self.channels)]
                                            ).reshape(self.encoder.shape))
            freq = rope_frequencies(self.rope)
            freq = None if freq is None else freq.to(dev)
            cache[dev] = (a.float().to(dev), inv.float().to(dev),
                          torch.from_numpy(self.mean).to(dev).unsqueeze(2),
                          torch.from_numpy(self.predictor).to(dev), freq)
        return cache[dev]

    def to_bytes(self) -> bytes:
        header = json.dumps({"model": self.model, "key": self.key, "layers": self.layers,
                             "channels": self.channels, "id": self.id, "unit": self.unit,
                             "rope": self.rope, "meta": self.meta},
                            sort_keys=True, separators=(",", ":")).encode()
        body = b"".join((MAGIC, struct.pack("<I", len(header)), header,
                         *(a.astype("<f4").tobytes() for a in
                           (self.mean, self.encoder, self.scale, self.predictor))))
        return body + hashlib.blake2b(body, digest_size=32).digest()


def from_bytes(data: bytes, where: str = "basis") -> Basis:
    """Parse and verify a basis file; any inconsistency is a ``CorruptBlobError``."""
    if len(data) < 40 or data[:4] != MAGIC:
        raise CorruptBlobError(f"{where}: not a kvctl basis file (or one of an older "
                               "format: recalibrate the model)")
    body, digest = data[:-32], data[-32:]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        raise CorruptBlobError(f"{where}: checksum mismatch")
    (hlen,) = struct.unpack_from("<I", body, 4)
    try:
        hdr = json.loads(body[8:8 + hlen])
        L, C = int(hdr["layers"]), int(hdr["channels"])
        unit = float(hdr["unit"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlobError(f"{where}: unreadable header: {exc}") from None
    if not (1 <= L <= MAX_LAYERS and 1 <= C <= MAX_CHANNELS):
        raise CorruptBlobError(f"{where}: {L} layers x {C} channels out of range")
    shapes = ((L, 2, C), (L, 2, C, C), (L, 2, C), (L, 2, C + 1))
    off = 8 + hlen
    need = off + 4 * sum(math.prod(s) for s in shapes)
    if len(body) != need:
        raise CorruptBlobError(f"{where}: {len(body)} bytes, the header says {need}")
    arrays = []
    for s in shapes:
        n = math.prod(s)
        arrays.append(np.frombuffer(body, "<f4", n, off).reshape(s).astype(np.float32))
        off += 4 * n
    try:
        b = Basis(model=str(hdr.get("model", "")), key=str(hdr.get("key", "")),
                  mean=arrays[0], encoder=arrays[1], scale=arrays[2], predictor=arrays[3],
                  unit=unit, rope=hdr.get("rope"), meta=dict(hdr.get("meta") or {}))
    except InvalidParamsError as exc:
        raise CorruptBlobError(f"{where}: {exc}") from None
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
