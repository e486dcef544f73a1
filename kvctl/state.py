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
    _instance: str | None = None

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

    def instance_id(self) -> str:
        """The instance the command acts on: the one the settings name; when they name
        none (the default), the only instance registered with the controller. Several
        registered is a usage error listing them; none, or a controller that does not list
        its workers (upstream LMCache's), leaves the default."""
        s = self.settings
        if self._instance is None:
            self._instance = s.instance_id
            if s.sources.get("instance_id", "default") == "default":
                from kvctl.errors import KvctlError, UsageError

                try:
                    with self.client() as client:
                        found = sorted({str(w.get("instance_id")) for w in client.workers()})
                except KvctlError:
                    found = []  # the command itself will say what is wrong there
                if len(found) == 1:
                    self._instance = found[0]
                elif len(found) > 1:
                    raise UsageError(
                        f"{len(found)} instances are registered with {s.controller} "
                        f"({', '.join(found)}); name one with --instance-id (or "
                        "KVCTL_INSTANCE_ID)")
        return self._instance

    def coordinator(self, what: str) -> CoordinatorClient:
        """The client of the MP coordinator the settings name; a usage error without one."""
        from kvctl.coordinator_client import CoordinatorClient
        from kvctl.errors import UsageError

        url = self.settings.coordinator
        if not url:
            raise UsageError(f"{what} talks to an LMCache MP coordinator: pass --coordinator "
                             "URL (kvctl serve --coordinator-port, or `lmcache coordinator`) "
                             "or set KVCTL_COORDINATOR")
        return CoordinatorClient(url, self.settings.timeout, self.settings.auth_token)


def state(ctx: typer.Context) -> State:
    """The invocation's state (the root callback always sets one)."""
    obj = ctx.find_object(State)
    if obj is None:  # a command invoked without the root, e.g. from another program
        obj = ctx.ensure_object(State)
    return obj
