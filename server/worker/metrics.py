"""Prometheus metrics, computed from the worker's state at scrape time.

Served by `kvctl worker` on its port (``GET /metrics``) and, for the embedded worker, by the
controller's /metrics (controller and monitor ports). Every name starts ``kvctl_``; labels
are bounded sets (locations, codec methods, ops, statuses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvctl.server.worker.runtime import WorkerRuntime


def render(*collectors: Collector) -> bytes:
    """One scrape of ``collectors`` in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return generate_latest(registry)


class BuildInfo(Collector):
    def __init__(self, part: str) -> None:
        self.part = part

    def collect(self) -> Iterator[Any]:
        from kvctl import __version__

        info = GaugeMetricFamily("kvctl_build_info", "Always 1: the version and the part "
                                 "(controller, worker) this process runs",
                                 labels=["version", "part"])
        info.add_metric([__version__, self.part], 1.0)
        yield info


def process_collectors(part: str) -> list[Collector]:
    """What every kvctl process publishes once: its CPU, memory and open files (Linux), as
    kvctl_process_*, and kvctl_build_info."""
    return [ProcessCollector(namespace="kvctl", registry=None), BuildInfo(part)]


class HeartbeatCollector(Collector):
    """A `kvctl worker`'s own view of its liveness: registered or not, beats that failed."""

    def __init__(self, beat: Any) -> None:
        self.beat = beat  # kvctl.server.runner.Heartbeat

    def collect(self) -> Iterator[Any]:
        b = self.beat
        yield GaugeMetricFamily("kvctl_worker_registered",
                                "1 while the last heartbeat reached a controller, else 0",
                                value=1.0 if b.registered_with else 0.0)
        beats = CounterMetricFamily("kvctl_worker_heartbeats",
                                    "Heartbeat rounds, by result (ok: a controller answered)",
                                    labels=["result"])
        beats.add_metric(["ok"], b.beats_ok)
        beats.add_metric(["failed"], b.beats_failed)
        yield beats


class RuntimeCollector(Collector):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Any]:
        rt = self.rt
        ev = CounterMetricFamily("kvctl_events", "Events entering each status, by operation",
                                 labels=["op", "status"])
        for (op, status), n in sorted(rt.events.transitions.items()):
            ev.add_metric([op, status], n)
        yield ev

        chunks = GaugeMetricFamily("kvctl_store_chunks", "Chunks held per location",
                                   labels=["location"])
        nbytes = GaugeMetricFamily("kvctl_store_bytes", "Bytes held per location",
                                   labels=["location"])
        pinned = GaugeMetricFamily("kvctl_store_pinned_chunks", "Pinned chunks per location",
                                   labels=["location"])
        cap = GaugeMetricFamily("kvctl_store_capacity_bytes", "Capacity per bounded location",
                                labels=["location"])
        by_codec = GaugeMetricFamily("kvctl_store_codec_bytes",
                                     "Bytes held per location and codec of the chunks",
                                     labels=["location", "codec"])
        evictions = CounterMetricFamily("kvctl_tier_evictions",
                                        "Chunks evicted to make room, per location",
                                        labels=["location"])
        for name, backend in rt.backends.items():
            try:
                s = backend.stats()
            except Exception:  # an unreachable Redis must not break the scrape
                continue
            chunks.add_metric([name], s.chunks)
            nbytes.add_metric([name], s.bytes)
            pinned.add_metric([name], s.pinned_chunks)
            for codec, b in sorted(s.bytes_by_codec.items()):
                by_codec.add_metric([name, codec], b)
            # 0 for an unbounded location: one series per tier, for the dashboards' sums
            evictions.add_metric([name], s.evictions)
            if s.capacity_bytes is not None:
                cap.add_metric([name], s.capacity_bytes)
        yield from (chunks, nbytes, pinned, cap, by_codec, evictions)

        # the engine's reads and writes through the tiers (read-through / write-through)
        c = rt.store.counters
        with c.lock:
            tables = {t: dict(getattr(c, t)) for t in
                      ("hits", "misses", "stored", "store_failures", "read_failures")}
            promotions = c.promotions
        helps = {"hits": "Chunks the engine read from each tier (the fastest holding them)",
                 "misses": "Chunks the engine looked for in a tier that did not hold them",
                 "stored": "Chunks written to each tier by write-through",
                 "store_failures": "Write-through batches a tier refused (full or failing)",
                 "read_failures": "Reads a tier failed (it was skipped)"}
        for table, values in tables.items():
            fam = CounterMetricFamily(f"kvctl_tier_{table}", helps[table], labels=["location"])
            for name in rt.backends:
                fam.add_metric([name], values.get(name, 0))
            yield fam
        yield CounterMetricFamily("kvctl_tier_promotions",
                                  "Chunks copied into memory after a read from a slower tier",
                                  value=promotions)

        yield CounterMetricFamily("kvctl_bytes_saved", "Bytes saved by compression",
                                  value=rt.bytes_saved)
        yield GaugeMetricFamily("kvctl_queue_depth", "Events queued or running",
                                value=rt.queue_depth())
        yield from rt.codec_times.durations.collect()
        secs = CounterMetricFamily("kvctl_codec_seconds", "Time spent in codecs",
                                   labels=["op", "method"])
        n = CounterMetricFamily("kvctl_codec_chunks", "Chunks through codecs",
                                labels=["op", "method"])
        for key, v in sorted(rt.codec_times.seconds.items()):
            secs.add_metric(list(key), v)
            n.add_metric(list(key), rt.codec_times.chunks.get(key, 0))
        yield from (secs, n)

