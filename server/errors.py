"""Domain errors raised by the controller and its workers.

Each class says what went wrong (``detail``), its stable ``kind`` (so a worker's error
crosses the HTTP transport and is raised again, as the same class, in the controller), and
the HTTP status it is answered with. Both tables, kind -> class (`ERRORS_BY_KIND`) and
class -> status (`kvctl.server.http.app.ERROR_STATUS`), are derived from the classes, so a
new error is declared once.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class; ``detail`` is the sentence the client sees."""

    kind = "error"
    http_status = 500  # an error without a status of its own is a bug of ours

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(DomainError):
    """The request is well-formed JSON but asks for something impossible."""

    kind = "bad_request"
    http_status = 400


class UnknownInstance(DomainError):
    kind = "unknown_instance"
    http_status = 404


class UnknownLocation(DomainError):
    kind = "unknown_location"
    http_status = 404


class UnknownMethod(DomainError):
    kind = "unknown_method"
    http_status = 400


class UnknownEvent(DomainError):
    kind = "unknown_event"
    http_status = 404


class TooLarge(DomainError):
    kind = "too_large"
    http_status = 413


class WorkerUnavailable(DomainError):
    """The worker that owns an instance is dead, unreachable or too slow to answer."""

    kind = "worker_unavailable"
    http_status = 503


class StateUnavailable(DomainError):
    """The controller's state store (Redis) cannot be reached."""

    kind = "state_unavailable"
    http_status = 503


class StoreUnavailable(DomainError):
    """A worker's storage location failed (a StorageError that crossed the transport)."""

    kind = "store_unavailable"
    http_status = 503


class Conflict(DomainError):
    """The request conflicts with what is stored (e.g. stacking two lossy codecs)."""

    kind = "conflict"
    http_status = 409


class Busy(DomainError):
    """Too many jobs wait already (``max_queued_jobs``): nothing was queued; retry later."""

    kind = "busy"
    http_status = 429
    retry_after_s = 1


class UnknownChunk(DomainError):
    """A chunk that is not (or no longer) in a location."""

    kind = "unknown_chunk"
    http_status = 404


class ChecksumMismatch(DomainError):
    """Bytes that arrived differ from the bytes that were sent."""

    kind = "checksum_mismatch"
    http_status = 409


def _classes(base: type[DomainError]) -> list[type[DomainError]]:
    out = []
    for cls in base.__subclasses__():
        out += [cls, *_classes(cls)]
    return out


ERRORS = tuple(_classes(DomainError))
ERRORS_BY_KIND: dict[str, type[DomainError]] = {cls.kind: cls for cls in ERRORS}
assert len(ERRORS_BY_KIND) == len(ERRORS), "two domain errors share a kind"


def error_from_kind(kind: str | None, detail: str) -> DomainError:
    """Rebuild a worker's error on the controller's side of the transport."""
    return ERRORS_BY_KIND.get(kind or "", DomainError)(detail)
