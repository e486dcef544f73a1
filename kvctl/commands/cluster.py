"""Cluster state: health, workers, codecs."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from kvctl.errors import KvctlError
from kvctl.output import escape, fmt_bytes, kv_table
from kvctl.state import state


def health(ctx: typer.Context) -> None:
    """Error code of each worker of an instance (0 = healthy); exit 1 if any is not."""
    st = state(ctx)
    inst = st.settings.instance_id
    with st.client() as client:
        reply = client.health(inst)
    codes = reply.get("error_codes") or {}
    st.out.result(reply, lambda: kv_table(
        [(w, c, "healthy" if c == 0 else "unhealthy") for w, c in codes.items()],
        ("worker", "error code", "state")))
    bad = [w for w, c in codes.items() if c != 0]
    if bad:
        raise KvctlError(f"{inst}: worker(s) {', '.join(map(str, bad))} unhealthy")
    if not codes:
        raise KvctlError(f"{inst}: no workers registered")


def workers(
    ctx: typer.Context,
    worker_id: Annotated[list[int] | None, typer.Option(
        "--worker-id", metavar="N", show_default=False,
        help="Only this worker (repeatable).")] = None,
) -> None:
    """Workers of an instance and what each stores per location."""
    st = state(ctx)
    inst = st.settings.instance_id
    with st.client() as client:
        reply = client.query_worker_info(inst, worker_id)
    if st.out.json:
        st.out.print_json(reply)
        return
    infos = reply.get("worker_infos") or []
    if not infos:
        st.out.print(f"no workers for {inst}")
        return
    now = time.time()
    for w in infos:
        beat = w.get("last_heartbeat_time")
        age = f", heartbeat {now - beat:.0f}s ago" if isinstance(beat, int | float) else ""
        st.out.markup(f"[bold]worker {escape(str(w.get('worker_id')))}[/] of "
                      f"{escape(str(w.get('instance_id')))} at "
                      f"{escape(str(w.get('ip')))}:{escape(str(w.get('port')))}{escape(age)}")
        locs = w.get("locations")
        if locs:
            rows = [(loc.get("location"), loc.get("chunks"), fmt_bytes(loc.get("bytes")),
                     fmt_bytes(loc.get("capacity_bytes"))
                     if loc.get("capacity_bytes") else "unbounded",
                     loc.get("pinned_chunks")) for loc in locs]
            st.out.print(kv_table(rows, ("location", "chunks", "bytes", "capacity", "pinned")))


def codecs(ctx: typer.Context) -> None:
    """Compression methods the controller accepts."""
    st = state(ctx)
    with st.client() as client:
        reply = client.codecs()
    default = reply.get("default")
    st.out.result(reply, lambda: "\n".join(
        f"{m}  (default)" if m == default else str(m) for m in reply.get("methods") or []))
