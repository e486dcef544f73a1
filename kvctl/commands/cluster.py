"""Cluster state: health, codecs (`kvctl workers` is kvctl.commands.workers)."""

from __future__ import annotations

from typing import Any

import typer

from kvctl.client import NoWorkerList
from kvctl.errors import KvctlError
from kvctl.output import kv_table
from kvctl.state import State, state


def health(ctx: typer.Context) -> None:
    """Error code of every worker of the cluster (0 = healthy), or of one instance's with
    --instance-id; exit 1 if any is not."""
    st = state(ctx)
    if st.settings.sources.get("instance_id", "default") == "default":
        with st.client() as client:
            try:
                found = client.workers()
            except NoWorkerList:  # upstream LMCache's controller: the default instance only
                found = None
        if found is not None:
            _cluster_health(st, found)
            return
    _instance_health(st, st.settings.instance_id)


def _instance_health(st: State, inst: str) -> None:
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


def _cluster_health(st: State, found: list[dict[str, Any]]) -> None:
    """Every instance's workers in one table; the JSON groups error codes by instance."""
    instances: dict[str, dict[str, Any]] = {}
    for w in found:
        iid = str(w.get("instance_id"))
        instances.setdefault(iid, {})[str(w.get("worker_id"))] = w.get("error_code")
    bad = [f"{w.get('instance_id')} worker {w.get('worker_id')} "
           f"({w.get('state')}, code {w.get('error_code')})"
           for w in found if w.get("error_code") != 0]
    reply = {"healthy": bool(found) and not bad,
             "instances": {i: {"error_codes": c} for i, c in sorted(instances.items())},
             "workers": found}
    st.out.result(reply, lambda: kv_table(
        [(w.get("instance_id"), w.get("worker_id"), w.get("state"), w.get("error_code"),
          "healthy" if w.get("error_code") == 0 else "unhealthy") for w in found],
        ("instance", "worker", "heartbeat", "error code", "state")) if found else None)
    if bad:
        raise KvctlError(f"{len(bad)} of {len(found)} workers unhealthy: {'; '.join(bad)}")
    if not found:
        raise KvctlError("no workers registered")


def codecs(ctx: typer.Context) -> None:
    """Compression methods the controller accepts."""
    st = state(ctx)
    with st.client() as client:
        reply = client.codecs()
    default = reply.get("default")
    st.out.result(reply, lambda: "\n".join(
        f"{m}  (default)" if m == default else str(m) for m in reply.get("methods") or []))
