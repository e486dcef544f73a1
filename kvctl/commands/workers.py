"""`kvctl workers`: every worker the controller knows, alive or dead, and what it stores."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kvctl.errors import KvctlError
from kvctl.output import escape, fmt_bytes, kv_table
from kvctl.state import state


def _age(beat: Any, now: float) -> str:
    return f"{max(0.0, now - beat):.1f}s ago" if isinstance(beat, int | float) else "-"


def workers(
    ctx: typer.Context,
    instances: Annotated[list[str] | None, typer.Argument(
        metavar="[INSTANCE]...", show_default=False,
        help="Only the workers of these instances.")] = None,
) -> None:
    """Workers of every instance: kind (kvctl / LMCache), address, last heartbeat, alive/dead,
    chunks and bytes."""
    st = state(ctx)
    with st.client() as client:
        found = client.workers()
    if instances:
        found = [w for w in found if w.get("instance_id") in instances]
        if not found:
            raise KvctlError(f"no worker of {', '.join(instances)} is registered")
    if st.out.json:
        st.out.print_json({"workers": found})
        return
    if not found:
        st.out.print("no workers registered")
        return
    now = time.time()
    for w in found:
        alive = w.get("state") == "alive"
        lmcache = w.get("kind") == "lmcache"
        kind = f"LMCache worker {w.get('worker_id')}" if lmcache else "kvctl"
        extra = ""
        if lmcache:
            extra = (f", {w.get('key_count') or 0} chunks, directory {w.get('directory')}"
                     + ("" if w.get("held_here", True) else ", held by another controller"))
        st.out.markup(
            f"[bold]{escape(str(w.get('instance_id')))}[/] ({escape(kind)}) "
            f"[{'green' if alive else 'red'}]{escape(str(w.get('state')))}[/] at "
            f"{escape(str(w.get('url')))}, heartbeat "
            f"{escape(_age(w.get('last_heartbeat_time'), now))}{escape(extra)}")
        rows = [(loc.get("location"), loc.get("chunks"), fmt_bytes(loc.get("bytes")),
                 fmt_bytes(loc.get("capacity_bytes"))
                 if loc.get("capacity_bytes") else "unbounded", loc.get("pinned_chunks"))
                for loc in w.get("locations") or []]
        if rows:
            st.out.print(kv_table(rows, ("location", "chunks", "bytes", "capacity", "pinned")))
