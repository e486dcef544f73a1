"""The one error type commands raise, and kvctl's exit codes (README, `kvctl --help`).

0   done
1   failed: the controller is unreachable or failed, an event failed, an event cannot
    be followed, the URL is not a controller
2   usage error, or rejected: the controller refused the request (HTTP 4xx: unknown
    instance, method, location or event), or nothing matched so nothing was done
130 interrupted (Ctrl-C); the controller keeps running what it was given
141 stdout closed early (`kvctl ... | head`)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REJECTED = 2  # the LMCache CLI's code for "rejected"; Click uses 2 for usage errors
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer

GLOBAL_OPTIONS_HELP = ("Global options, before or after the command: --controller, --timeout, "
                       "--tokenizer, --instance-id, --json (kvctl --help).")
EXIT_CODES_HELP = ("Exit codes: 0 done; 1 failed (controller unreachable or failing, event "
                   "failed or not followable, not a controller); 2 usage error, or rejected "
                   "(HTTP 4xx, or nothing matched: nothing was done); 130 interrupted; 141 "
                   "stdout closed early.")


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


class Rejected(KvctlError):
    """Nothing was done: nothing matched the request (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_REJECTED)
