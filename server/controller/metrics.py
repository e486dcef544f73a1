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
        up = GaugeMetricFamily("kvctl_worker_up", "1 if the worker heartbeats, else 0",
                               labels=["instance_id"])
        age = GaugeMetricFamily("kvctl_worker_heartbeat_age_seconds",
                                "Seconds since the worker's last heartbeat",
                                labels=["instance_id"])
        chunks = GaugeMetricFamily("kvctl_worker_chunks", "Chunks held per worker and location",
                                   labels=["instance_id", "location"])
        nbytes = GaugeMetricFamily("kvctl_worker_bytes", "Bytes held per worker and location",
                                   labels=["instance_id", "location"])
        # one sample per instance: an LMCache instance has a worker per tensor-parallel rank
        # (up only if every rank is, the oldest heartbeat, chunks summed over ranks)
        per: dict[str, dict[str, Any]] = {}
        for v in self.views:
            e = per.setdefault(v["instance_id"], {"up": 1.0, "age": 0.0, "chunks": {},
                                                  "bytes": {}})
            e["up"] = min(e["up"], 1.0 if v["state"] == "alive" else 0.0)
            e["age"] = max(e["age"], v["heartbeat_age_s"])
            for loc in v["locations"]:
                name = loc["location"]
                e["chunks"][name] = e["chunks"].get(name, 0) + loc["chunks"]
                e["bytes"][name] = e["bytes"].get(name, 0) + loc["bytes"]
        for iid, e in per.items():
            up.add_metric([iid], e["up"])
            age.add_metric([iid], e["age"])
            for name, n in e["chunks"].items():
                chunks.add_metric([iid, name], n)
                nbytes.add_metric([iid, name], e["bytes"][name])
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
