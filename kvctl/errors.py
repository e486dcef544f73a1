"""The one error type commands raise; the root app turns it into a stderr line + exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class KvctlError(Exception):
    """A failure the operator can act on: ``message`` is shown as is, without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(KvctlError):
    """Bad or conflicting arguments (exit 2, like Click's own usage errors)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
