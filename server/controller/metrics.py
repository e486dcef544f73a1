"""The controller's /metrics: its embedded worker's (if any) plus one gauge set per worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvctl.server.http.metrics import RequestMetrics
from kvctl.server.worker.metrics import RuntimeCollector, process_collectors, render
from kvctl.server.worker.runtime import WorkerRuntime


class WorkersCollector(Collector):
    def __init__(self, views: list[dict[str, Any]]) -> None:
        self.views = views

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("kvctl_worker_up", "1 if the worker heartbeats, else 0",
                               labels=["instance_id"])
        age = GaugeMetricFamily("kvctl_worker_heartbeat_age_seconds",
                                "Seconds since the worker's last heartbeat",
                                labels=["instance_id"])
        chunks = GaugeMetricFamily("kvctl_worker_chunks", "Chunks held per worker and location",
                                   labels=["instance_id", "location"])
        nbytes = GaugeMetricFamily("kvctl_worker_bytes", "Bytes held per worker and location",
                                   labels=["instance_id", "location"])
        for v in self.views:
            iid = v["instance_id"]
            up.add_metric([iid], 1.0 if v["state"] == "alive" else 0.0)
            age.add_metric([iid], v["heartbeat_age_s"])
            for loc in v["locations"]:
                chunks.add_metric([iid, loc["location"]], loc["chunks"])
                nbytes.add_metric([iid, loc["location"]], loc["bytes"])
        states = GaugeMetricFamily("kvctl_workers", "Registered workers, by state",
                                   labels=["state"])
        for state in ("alive", "dead"):
            states.add_metric([state], sum(v["state"] == state for v in self.views))
        yield from (up, age, chunks, nbytes, states)


def render_controller_metrics(runtime: WorkerRuntime | None, views: list[dict[str, Any]],
                              requests: RequestMetrics | None = None) -> bytes:
    """The controller's /metrics: its workers, its requests, its process, and the embedded
    worker's tiers and codecs (when it runs one)."""
    parts: list[Collector] = [WorkersCollector(views), *process_collectors("controller")]
    if runtime is not None:
        parts.append(RuntimeCollector(runtime))
    if requests is not None:
        parts.append(requests.latency)
    return render(*parts)
