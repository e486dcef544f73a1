"""`kvctl workers`: every worker the controller knows, alive or dead, and what it stores."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kvctl import output
from kvctl.commands._common import connect
from kvctl.errors import KvctlError
from kvctl.options import ControllerOpt, JsonOpt, TimeoutOpt
from kvctl.settings import resolve


def _age(beat: Any, now: float) -> str:
    return f"{max(0.0, now - beat):.1f}s ago" if isinstance(beat, int | float) else "-"


def workers(
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", metavar="ID", show_default=False,
        help="Only the worker of this instance.")] = None,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Workers of every instance: address, last heartbeat, alive/dead, chunks and bytes."""
    with connect(resolve(controller, timeout)) as client:
        found = client.workers()
    if instance_id is not None:
        found = [w for w in found if w.get("instance_id") == instance_id]
        if not found:
            raise KvctlError(f"no worker of instance {instance_id!r} is registered")
    if as_json:
        output.print_json({"workers": found})
        return
    if not found:
        output.out().print("no workers registered")
        return
    now = time.time()
    for w in found:
        state = str(w.get("state"))
        style = "green" if state == "alive" else "red"
        output.out().print(
            f"[bold]{output.escape(str(w.get('instance_id')))}[/] "
            f"[{style}]{output.escape(state)}[/] at {output.escape(str(w.get('url')))}, "
            f"heartbeat {output.escape(_age(w.get('last_heartbeat_time'), now))}",
            soft_wrap=True)
        rows = [(loc.get("location"), loc.get("chunks"), output.fmt_bytes(loc.get("bytes")),
                 output.fmt_bytes(loc.get("capacity_bytes"))
                 if loc.get("capacity_bytes") else "unbounded", loc.get("pinned_chunks"))
                for loc in w.get("locations") or []]
        if rows:
            output.out().print(output.kv_table(
                rows, ("location", "chunks", "bytes", "capacity", "pinned")))
