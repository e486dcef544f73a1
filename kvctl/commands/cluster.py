"""Cluster state: health, codecs (`kvctl workers` is kvctl.commands.workers)."""

from __future__ import annotations

import typer

from kvctl.errors import KvctlError
from kvctl.output import kv_table
from kvctl.state import state


def health(ctx: typer.Context) -> None:
    """Error code of each worker of an instance (0 = healthy); exit 1 if any is not.

    Without --instance-id: the only instance registered (several: name one)."""
    st = state(ctx)
    inst = st.instance_id()
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


def codecs(ctx: typer.Context) -> None:
    """Compression methods the controller accepts."""
    st = state(ctx)
    with st.client() as client:
        reply = client.codecs()
    default = reply.get("default")
    st.out.result(reply, lambda: "\n".join(
        f"{m}  (default)" if m == default else str(m) for m in reply.get("methods") or []))
