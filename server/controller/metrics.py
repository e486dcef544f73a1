"""The controller's /metrics: its embedded worker's (if any) plus one gauge set per worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvctl.server.http.metrics import RequestMetrics
from kvctl.server.worker.metrics import RuntimeCollector, process_collectors, render
from kvctl.server.worker.runtime import WorkerRuntime


class WorkersCollector(Collector):
    def __init__(self, views: list[dict[str, Any]]) -> None:
        self.views = views

    def collect(self) -> Iterator[Any]:
        # an LMCache fleet's instance has one worker per rank: the worker id is in each key
        lab = ["instance_id", "worker_id"]
        up = GaugeMetricFamily("kvctl_worker_up", "1 if the worker heartbeats, else 0",
                               labels=lab)
        age = GaugeMetricFamily("kvctl_worker_heartbeat_age_seconds",
                                "Seconds since the worker's last heartbeat", labels=lab)
        chunks = GaugeMetricFamily("kvctl_worker_chunks", "Chunks held per worker and location",
                                   labels=[*lab, "location"])
        nbytes = GaugeMetricFamily("kvctl_worker_bytes", "Bytes held per worker and location",
                                   labels=[*lab, "location"])
        for v in self.views:
            key = [str(v["instance_id"]), str(v.get("worker_id", 0))]
            up.add_metric(key, 1.0 if v["state"] == "alive" else 0.0)
            age.add_metric(key, v["heartbeat_age_s"])
            for loc in v["locations"]:
                chunks.add_metric([*key, loc["location"]], loc["chunks"])
                nbytes.add_metric([*key, loc["location"]], loc["bytes"])
        states = GaugeMetricFamily("kvctl_workers", "Registered workers, by state",
                                   labels=["state"])
        for state in ("alive", "dead"):
            states.add_metric([state], sum(v["state"] == state for v in self.views))
        yield from (up, age, chunks, nbytes, states)


class LMCacheWireCollector(Collector):
    """Counters of the LMCache wire (`LMCacheFleet.stats`)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        bad = CounterMetricFamily("kvctl_lmcache_bad_frames", "LMCache frames refused, by "
                                  "reason", labels=["reason"])
        for reason, n in sorted(self.stats["bad_frames"].items()):
            bad.add_metric([reason], n)
        syncs = CounterMetricFamily("kvctl_lmcache_full_syncs", "Full syncs asked of "
                                    "LMCache workers")
        syncs.add_metric([], self.stats["full_syncs_requested"])
        dropped = CounterMetricFamily("kvctl_lmcache_dropped_admits", "Admits beyond "
                                      "lmcache_max_keys, dropped")
        dropped.add_metric([], self.stats["dropped_admits"])
        yield from (bad, syncs, dropped)


def render_controller_metrics(runtime: WorkerRuntime | None, views: list[dict[str, Any]],
                              requests: RequestMetrics | None = None,
                              lmcache_stats: dict[str, Any] | None = None) -> bytes:
    """The controller's /metrics: its workers, its requests, its process, the embedded
    worker's tiers and codecs (when it runs one) and the LMCache wire (when it speaks it)."""
    parts: list[Collector] = [WorkersCollector(views), *process_collectors("controller")]
    if lmcache_stats is not None:
        parts.append(LMCacheWireCollector(lmcache_stats))
    if runtime is not None:
        parts.append(RuntimeCollector(runtime))
    if requests is not None:
        parts.append(requests.latency)
    return render(*parts)
