"""Cluster state: health, workers, codecs."""

from __future__ import annotations

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
