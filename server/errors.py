"""Domain errors raised by the controller and its workers.

They say what went wrong, not how to answer it: `kvctl.server.http.app.ERROR_STATUS` is the one
table that maps each to an HTTP status. Each error has a stable ``kind`` so that a worker's
error crosses the HTTP transport and is raised again, as the same class, in the controller.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class; ``detail`` is the sentence the client sees."""

    kind = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(DomainError):
    """The request is well-formed JSON but asks for something impossible."""

    kind = "bad_request"


class UnknownInstance(DomainError):
    kind = "unknown_instance"


class UnknownLocation(DomainError):
    kind = "unknown_location"


class UnknownMethod(DomainError):
    kind = "unknown_method"


class UnknownEvent(DomainError):
    kind = "unknown_event"


class TooLarge(DomainError):
    kind = "too_large"


class WorkerUnavailable(DomainError):
    """The worker that owns an instance is dead, unreachable or too slow to answer."""

    kind = "worker_unavailable"


class StateUnavailable(DomainError):
    """The controller's state store (Redis) cannot be reached."""

    kind = "state_unavailable"


class StoreUnavailable(DomainError):
    """A worker's storage location failed (a StorageError that crossed the transport)."""

    kind = "store_unavailable"


class Conflict(DomainError):
    """The request conflicts with what is stored (e.g. stacking two lossy codecs)."""

    kind = "conflict"


class Busy(DomainError):
    """Too many jobs wait already (``max_queued_jobs``): nothing was queued; retry later."""

    kind = "busy"
    retry_after_s = 1


class UnknownChunk(DomainError):
    """A chunk that is not (or no longer) in a location."""

    kind = "unknown_chunk"


class ChecksumMismatch(DomainError):
    """Bytes that arrived differ from the bytes that were sent."""

    kind = "checksum_mismatch"


ERRORS_BY_KIND: dict[str, type[DomainError]] = {
    cls.kind: cls for cls in (BadRequest, UnknownInstance, UnknownLocation, UnknownMethod,
                              UnknownEvent, TooLarge, WorkerUnavailable, StateUnavailable,
                              StoreUnavailable, ChecksumMismatch, Conflict, Busy, UnknownChunk)
}


def error_from_kind(kind: str | None, detail: str) -> DomainError:
    """Rebuild a worker's error on the controller's side of the transport."""
    return ERRORS_BY_KIND.get(kind or "", DomainError)(detail)
