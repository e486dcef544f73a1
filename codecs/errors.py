"""Typed errors of the codec library. Every failure a caller can meet is a ``CodecError``."""

from __future__ import annotations


class CodecError(Exception):
    """Base class: anything that went wrong encoding, decoding or looking up a codec."""


class UnknownCodecError(CodecError, KeyError):
    """A codec name or method string that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown codec"


class InvalidParamsError(CodecError, ValueError):
    """Codec parameters out of range or of the wrong type."""


class InvalidInputError(CodecError, ValueError):
    """A tensor the codec cannot encode (wrong rank, dtype, or values out of range)."""


class NonFiniteInputError(InvalidInputError):
    """A lossy codec was given inf or nan; only ``raw`` stores them."""


class BlobError(CodecError, ValueError):
    """A blob that cannot be decoded. Subclasses say why."""


class TruncatedBlobError(BlobError):
    """The blob is shorter than its header says."""


class ForeignBlobError(BlobError):
    """The bytes are not a kvctl codec blob at all (bad magic)."""


class UnsupportedVersionError(BlobError):
    """A kvctl blob written in a format version this library does not read."""


class ChecksumError(BlobError):
    """The checksum does not match: the blob was corrupted in storage or transit."""


class CorruptBlobError(BlobError):
    """The blob's header or payload is inconsistent although its checksum matched."""


class WrongCodecError(BlobError):
    """``codec.decode`` was given a blob written by a different codec."""


class MissingBasisError(BlobError):
    """A transform-coded blob names a basis this process cannot find.

    ``basis`` is the content hash the blob names; decoding never guesses another basis.
    """

    def __init__(self, message: str, basis: str = "") -> None:
        super().__init__(message)
        self.basis = basis
