"""The codec protocol, a shared base class and the registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kvctl.codecs import blob as _blob
from kvctl.codecs.errors import (
    BlobError,
    CorruptBlobError,
    InvalidInputError,
    InvalidParamsError,
    NonFiniteInputError,
    UnknownCodecError,
    WrongCodecError,
)

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


@runtime_checkable
class Codec(Protocol):
    """What every codec offers. ``params`` is JSON-serialisable (plain types: it rebuilds the
    codec with ``get_codec(name, **params)``); a blob's header carries ``header_params``,
    the part of it a decoder needs."""

    name: str

    @property
    def params(self) -> dict[str, Any]: ...

    def encode(self, kv: torch.Tensor, history: Sequence[str] = ()) -> bytes: ...

    def decode(self, blob: bytes, device: str | torch.device = "cpu") -> torch.Tensor: ...


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[name]


class BaseCodec:
    """Validation, the container and empty tensors, shared by all codecs.

    Subclasses implement ``_encode(kv) -> payload`` and ``_decode(payload, info, device)``;
    both are only called with at least one element.
    """

    name: str = ""
    lossless: bool = False
    #: The most elements one payload byte can physically decode to (raw fp16: 0.5; int8,
    #: fp8: 1; 1-bit KIVI: 8; rANS-coded: ``rans.elements_per_byte``). A header
    #: claiming more is refused before anything is allocated, so a decoder's work and
    #: memory stay proportional to the payload it was given, checksum or not.
    max_elements_per_byte: float = 1.0
    # whether _encode takes the sequence position of the chunk's first token
    takes_position: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def header_params(self) -> dict[str, Any]:
        """What a blob's header records: the params a decoder needs to rebuild the codec
        (all of them unless a codec has encoder-only ones)."""
        return self.params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def check_input(self, kv: Any) -> None:
        import torch

        if not isinstance(kv, torch.Tensor):
            raise InvalidInputError(f"expected a torch.Tensor, got {type(kv).__name__}")
        if kv.dim() != 5:
            raise InvalidInputError(
                f"expected KV of shape [layers, 2, tokens, kv_heads, head_dim], got "
                f"{list(kv.shape)}")
        if kv.shape[1] != 2:
            raise InvalidInputError(f"dimension 1 must be 2 (K and V), got {kv.shape[1]}")
        if kv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidInputError(f"dtype {kv.dtype} not supported "
                                    "(float16, bfloat16 or float32)")

    def check_finite(self, x: torch.Tensor) -> None:
        """Lossy codecs refuse inf/nan and values beyond fp16 range (their scales are fp16).

        One fused reduction: ``amax`` propagates nan, so one comparison catches all three.
        """
        m = float(x.abs().amax())
        if not m <= FP16_MAX:
            raise NonFiniteInputError(
                f"{self.name} cannot encode non-finite or out-of-fp16-range values "
                f"(max |x| = {m}); use the raw codec, which stores them exactly")

    def encode(self, kv: torch.Tensor, history: Sequence[str] = (), position: int = 0
               ) -> bytes:
        """A blob of ``kv``; ``history`` (the lossy methods ``kv`` went through before)
        goes into its header. ``position``: the sequence position of ``kv``'s first token,
        for codecs that read it (``takes_position``: kvtc undoes the rotary embedding);
        a wrong one costs ratio, never correctness."""
        self.check_input(kv)
        if isinstance(position, bool) or not isinstance(position, int) or not (
                0 <= position < 1 << 31):
            raise InvalidParamsError(f"position must be an integer in [0, 2**31), got "
                                     f"{str(position)[:40]}")
        shape = tuple(int(s) for s in kv.shape)
        if kv.numel() == 0:
            payload = b""
        elif self.takes_position:
            payload = self._encode(kv.detach(), position)
        else:
            payload = self._encode(kv.detach())
        return _blob.pack(self.name, self.header_params, shape, dtype_name(kv.dtype), payload,
                          history)

    def decode(self, blob: bytes, device: str | torch.device = "cpu") -> torch.Tensor:
        info, payload = _blob.unpack(blob)
        if info.codec != self.name:
            raise WrongCodecError(f"blob was written by codec {_blob.short_repr(info.codec)}, "
                                  f"not {self.name!r}"
                                  "; use decode_blob() to decode any blob")
        return self.decode_payload(info, payload, device)

    def decode_payload(self, info: _blob.BlobInfo, payload: memoryview,
                       device: str | torch.device) -> torch.Tensor:
        import torch

        # a bad device is the caller's mistake, not a corrupt blob: say so before decoding
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidParamsError(f"invalid device {device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParamsError("device 'cuda' requested but CUDA is not available")
        self.check_claim(info, len(payload))
        dtype = torch_dtype(info.dtype)
        if info.num_elements == 0:
            if len(payload):
                raise CorruptBlobError("an empty tensor's blob carries a payload")
            return torch.empty(info.shape, dtype=dtype, device=device)
        try:
            out = self._decode(payload, info, device)
        except BlobError:  # already typed (a corrupt payload, a missing basis)
            raise
        except (ValueError, IndexError, RuntimeError, OverflowError, KeyError, TypeError) as exc:
            # The checksum matched, so this is a well-formed blob whose payload disagrees
            # with its header (a foreign writer or a bug): report it, never crash.
            raise CorruptBlobError(f"{info.codec} payload inconsistent with its header: "
                                   f"{str(exc)[:200]}") from None
        if tuple(out.shape) != info.shape:
            raise CorruptBlobError(f"decoded shape {list(out.shape)} != header {info.shape}")
        return out.to(dtype)

    def check_claim(self, info: _blob.BlobInfo, payload_bytes: int) -> None:
        """Refuse a header that claims more elements than ``payload_bytes`` can hold."""
        limit = math.floor(self.max_elements_per_byte * payload_bytes)
        if info.num_elements > limit:
            raise CorruptBlobError(
                f"{info.codec} blob claims shape {list(info.shape)} ({info.num_elements} "
                f"elements) but its {payload_bytes} B payload can decode to at most {limit}")

    def _encode(self, kv: torch.Tensor) -> bytes:
        raise NotImplementedError

    def _decode(self, payload: memoryview, info: _blob.BlobInfo,
                device: str | torch.device) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- registry ----
_FACTORIES: dict[str, Callable[..., BaseCodec]] = {}
# method string -> (codec name, params)
_METHODS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(name: str, factory: Callable[..., BaseCodec],
             methods: dict[str, dict[str, Any]] | None = None) -> None:
    _FACTORIES[name] = factory
    for method, params in (methods or {name: {}}).items():
        _METHODS[method] = (name, params)


def available_codecs() -> list[str]:
    """Codec names, as written in blob headers."""
    return list(_FACTORIES)


def available_methods() -> list[str]:
    """Method strings ``codec_for_method`` accepts (what the controller's ``method`` takes)."""
    return list(_METHODS)


def get_codec(name: str, **params: Any) -> BaseCodec:
    """A codec by name with optional parameters, e.g. ``get_codec("cachegen", level="compact")``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {name!r}; available: "
                                f"{', '.join(available_codecs())}") from None
    return factory(**params)


def codec_for_method(method: str) -> BaseCodec:
    """The codec behind a controller method string such as ``cachegen-compact`` or ``kivi-2``."""
    try:
        name, params = _METHODS[method.strip().lower()] if isinstance(method, str) else ("", {})
    except KeyError:
        name = ""
    if not name:
        raise UnknownCodecError(f"unknown method {method!r}; available methods: "
                                f"{', '.join(available_methods())}")
    return get_codec(name, **params)


def codec_from_info(info: _blob.BlobInfo) -> BaseCodec:
    """The codec that wrote a blob, rebuilt from its header's name and params."""
    from kvctl.codecs.errors import CodecError

    if info.codec not in _FACTORIES:
        raise CorruptBlobError(f"blob written by unknown codec {_blob.short_repr(info.codec)}; "
                               "this kvctl "
                               f"knows {', '.join(available_codecs())}")
    try:
        return get_codec(info.codec, **info.params)
    except (CodecError, TypeError) as exc:
        raise CorruptBlobError(f"blob header has invalid {info.codec} params "
                               f"{_blob.short_repr(info.params)}: {str(exc)[:200]}") from None


def decode_blob(blob: bytes, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode any blob, whichever codec wrote it, from its self-describing header."""
    info, payload = _blob.unpack(blob)
    return codec_from_info(info).decode_payload(info, payload, device)
