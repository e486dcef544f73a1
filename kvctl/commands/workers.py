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


def hit_rate(loc: dict[str, Any]) -> str:
    """Hits over lookups of the engine's reads from a tier, with the counts ("-" if none)."""
    hits, misses = loc.get("hits") or 0, loc.get("misses") or 0
    if not isinstance(hits, int) or not isinstance(misses, int) or hits + misses == 0:
        return "-"
    return f"{100 * hits / (hits + misses):.0f}% of {hits + misses}"


def codec_bytes(loc: dict[str, Any]) -> str:
    """Bytes held per codec, largest first: ``cachegen 1.2 MB, raw 300 KB``."""
    by_codec = loc.get("bytes_by_codec") or {}
    if not isinstance(by_codec, dict) or not by_codec:
        return "-"
    return ", ".join(f"{codec} {fmt_bytes(n)}" for codec, n in
                     sorted(by_codec.items(), key=lambda kv: -kv[1]))


def workers(
    ctx: typer.Context,
    instances: Annotated[list[str] | None, typer.Argument(
        metavar="[INSTANCE]...", show_default=False,
        help="Only the workers of these instances.")] = None,
) -> None:
    """Workers of every instance: kind (kvctl / LMCache), address, heartbeat, alive/dead, and
    per tier chunks, bytes per codec and the engine's hit rate."""
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
        locs = w.get("locations") or []
        rows = [(loc.get("location"), loc.get("chunks"), fmt_bytes(loc.get("bytes")),
                 fmt_bytes(loc.get("capacity_bytes"))
                 if loc.get("capacity_bytes") else "unbounded", loc.get("pinned_chunks"))
                for loc in locs]
        if rows:
            st.out.print(kv_table(rows, ("location", "chunks", "bytes", "capacity", "pinned")))
            # a second table: both fit 80 columns, one with every column would not
            st.out.print(kv_table(
                [(loc.get("location"), hit_rate(loc), loc.get("read_failures", 0),
                  loc.get("evictions", 0), codec_bytes(loc)) for loc in locs],
                ("location", "hit rate", "read failures", "evictions", "bytes per codec")))
