"""One state per invocation: the global flags, the settings resolved from them once, and
the output. The root callback (kvctl/cli.py) puts it in ``ctx.obj``; commands read it with
`state(ctx)` and make their controller client from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer

from kvctl.output import Output
from kvctl.settings import Flags, Settings, resolve

if TYPE_CHECKING:
    from kvctl.client import ControllerClient
    from kvctl.coordinator_client import CoordinatorClient


@dataclass
class State:
    flags: Flags = field(default_factory=Flags)
    out: Output = field(default_factory=Output)
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        """Resolved on first use, so `--help` and a malformed config file do not mix, and
        at most once per invocation."""
        if self._settings is None:
            self._settings = resolve(self.flags)
        return self._settings

    def client(self) -> ControllerClient:
        from kvctl.client import connect

        return connect(self.settings)

    def coordinator(self, what: str) -> CoordinatorClient:
        """The client of the MP coordinator the settings name; a usage error without one."""
        from kvctl.coordinator_client import CoordinatorClient
        from kvctl.errors import UsageError

        url = self.settings.coordinator
        if not url:
            raise UsageError(f"{what} talks to an LMCache MP coordinator: pass --coordinator "
                             "URL (kvctl serve --coordinator-port, or `lmcache coordinator`) "
                             "or set KVCTL_COORDINATOR")
        return CoordinatorClient(url, self.settings.timeout)


def state(ctx: typer.Context) -> State:
    """The invocation's state (the root callback always sets one)."""
    obj = ctx.find_object(State)
    if obj is None:  # a command invoked without the root, e.g. from another program
        obj = ctx.ensure_object(State)
    return obj
