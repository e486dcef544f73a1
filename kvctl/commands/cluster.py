"""Cluster state: health, workers, codecs."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from kvctl import output
from kvctl.commands._common import connect
from kvctl.errors import KvctlError
from kvctl.options import ControllerOpt, InstanceOpt, JsonOpt, TimeoutOpt
from kvctl.settings import resolve


def health(
    instance_id: InstanceOpt = None,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Error code of each worker of an instance (0 = healthy); exit 1 if any is not."""
    s = resolve(controller, timeout, instance_id=instance_id)
    with connect(s) as client:
        reply = client.health(s.instance_id)
    codes = reply.get("error_codes") or {}
    if as_json:
        output.print_json(reply)
    else:
        rows = [(w, c, "healthy" if c == 0 else "unhealthy") for w, c in codes.items()]
        output.out().print(output.kv_table(rows, ("worker", "error code", "state")))
    bad = [w for w, c in codes.items() if c != 0]
    if bad:
        raise KvctlError(f"{s.instance_id}: worker(s) {', '.join(map(str, bad))} unhealthy")
    if not codes:
        raise KvctlError(f"{s.instance_id}: no workers registered")


def workers(
    instance_id: InstanceOpt = None,
    worker_id: Annotated[list[int] | None, typer.Option(
        "--worker-id", show_default=False, help="Only this worker (repeatable).")] = None,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Workers of an instance and what each stores per location."""
    s = resolve(controller, timeout, instance_id=instance_id)
    with connect(s) as client:
        reply = client.query_worker_info(s.instance_id, worker_id)
    if as_json:
        output.print_json(reply)
        return
    infos = reply.get("worker_infos") or []
    if not infos:
        output.out().print(f"no workers for {s.instance_id}")
        return
    now = time.time()
    for w in infos:
        beat = w.get("last_heartbeat_time")
        age = f", heartbeat {now - beat:.0f}s ago" if isinstance(beat, int | float) else ""
        output.out().print(
            f"[bold]worker {output.escape(str(w.get('worker_id')))}[/] of "
            f"{output.escape(str(w.get('instance_id')))} at "
            f"{output.escape(str(w.get('ip')))}:{output.escape(str(w.get('port')))}"
            f"{output.escape(age)}", soft_wrap=True)
        locs = w.get("locations")
        if locs:
            rows = [(loc.get("location"), loc.get("chunks"), output.fmt_bytes(loc.get("bytes")),
                     output.fmt_bytes(loc.get("capacity_bytes"))
                     if loc.get("capacity_bytes") else "unbounded",
                     loc.get("pinned_chunks")) for loc in locs]
            output.out().print(output.kv_table(
                rows, ("location", "chunks", "bytes", "capacity", "pinned")))


def codecs(
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Compression methods the controller accepts."""
    with connect(resolve(controller, timeout)) as client:
        reply = client.codecs()
    if as_json:
        output.print_json(reply)
        return
    default = reply.get("default")
    for m in reply.get("methods") or []:
        mark = "  (default)" if m == default else ""
        output.out().print(output.escape(f"{m}{mark}"), soft_wrap=True)
