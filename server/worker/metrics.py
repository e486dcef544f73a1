"""Prometheus metrics, computed from the worker's state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvctl.server.worker.runtime import WorkerRuntime


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
                                        "Chunks evicted to make room, per bounded location",
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
            if s.capacity_bytes is not None:
                cap.add_metric([name], s.capacity_bytes)
                evictions.add_metric([name], s.evictions)
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
        secs = CounterMetricFamily("kvctl_codec_seconds", "Time spent in codecs",
                                   labels=["op", "method"])
        n = CounterMetricFamily("kvctl_codec_chunks", "Chunks through codecs",
                                labels=["op", "method"])
        for key, v in sorted(rt.codec_times.seconds.items()):
            secs.add_metric(list(key), v)
            n.add_metric(list(key), rt.codec_times.chunks.get(key, 0))
        yield from (secs, n)

