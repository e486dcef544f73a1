"""kvctl's KV-cache codec library (imported as ``kvctl.codecs``; no HTTP, no server).

::

    codec = get_codec("cachegen")                 # or get_codec("cachegen", level="compact")
    blob = codec.encode(kv)                       # kv: [layers, 2, tokens, kv_heads, head_dim]
    kv2 = codec.decode(blob, device="cpu")        # same shape and dtype
    decode_blob(blob)                             # any codec's blob, from its header
    peek_blob(blob)                               # BlobInfo without decoding

Codecs: ``cachegen`` (levels ``default``, ``compact``), ``raw`` (lossless), ``int8``,
``fp8``, ``kivi`` (2/4-bit), ``kvtc`` (transform coding with a per-model basis,
levels ``default``, ``compact``, ``max``). Method strings for the controller:
``available_methods()``.
"""

from kvctl.codecs import baselines as _baselines  # noqa: F401  (registers the codecs)
from kvctl.codecs import cachegen as _cachegen  # noqa: F401
from kvctl.codecs import kvtc as _kvtc  # noqa: F401
from kvctl.codecs.base import (
    BaseCodec,
    Codec,
    available_codecs,
    available_methods,
    codec_for_method,
    decode_blob,
    get_codec,
)
from kvctl.codecs.blob import FORMAT_VERSION, BlobInfo, peek_blob
from kvctl.codecs.errors import (
    BlobError,
    ChecksumError,
    CodecError,
    CorruptBlobError,
    ForeignBlobError,
    InvalidInputError,
    InvalidParamsError,
    MissingBasisError,
    NonFiniteInputError,
    TruncatedBlobError,
    UnknownCodecError,
    UnsupportedVersionError,
    WrongCodecError,
)

__all__ = [
    "FORMAT_VERSION",
    "BaseCodec",
    "BlobError",
    "BlobInfo",
    "ChecksumError",
    "Codec",
    "CodecError",
    "CorruptBlobError",
    "ForeignBlobError",
    "InvalidInputError",
    "InvalidParamsError",
    "MissingBasisError",
    "NonFiniteInputError",
    "TruncatedBlobError",
    "UnknownCodecError",
    "UnsupportedVersionError",
    "WrongCodecError",
    "available_codecs",
    "available_methods",
    "codec_for_method",
    "decode_blob",
    "get_codec",
    "peek_blob",
]
