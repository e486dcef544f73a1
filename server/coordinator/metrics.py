"""The coordinator's /metrics: what upstream's hides (per-instance ingest state) and the
directory's bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvctl.server.coordinator.store import Cursor, Instance


class _Snapshot(Collector):
    def __init__(self, coord: Any, cursors: dict[str, Cursor], counters: dict[str, int],
                 insts: list[Instance]) -> None:
        self.coord, self.cursors, self.counters, self.insts = coord, cursors, counters, insts

    def collect(self) -> Iterator[Any]:
        lab = ["instance_id"]
        seq = GaugeMetricFamily("kvctl_coordinator_last_seq",
                                "Last batch seq admitted per MP server", labels=lab)
        inc = GaugeMetricFamily("kvctl_coordinator_incarnation",
                                "Current incarnation per MP server", labels=lab)
        gap = GaugeMetricFamily("kvctl_coordinator_gap_detected",
                                "1 once a seq gap was seen in the current incarnation "
                                "(the directory misses what the lost batches said)",
                                labels=lab)
        fams = {name: CounterMetricFamily(f"kvctl_coordinator_batches_{name}",
                                          f"Event batches per MP server: {name}", labels=lab)
                for name in ("applied", "duplicates", "stale")}
        gaps = CounterMetricFamily("kvctl_coordinator_seq_gaps",
                                   "Seq jumps (lost batches) per MP server", labels=lab)
        dropped = CounterMetricFamily("kvctl_coordinator_dropped_entries",
                                      "Store entries refused because the directory held "
                                      "max_keys keys, per MP server", labels=lab)
        for iid, c in sorted(self.cursors.items()):
            seq.add_metric([iid], c.last_seq)
            inc.add_metric([iid], c.incarnation)
            gap.add_metric([iid], 1.0 if c.gap_detected else 0.0)
            fams["applied"].add_metric([iid], c.applied)
            fams["duplicates"].add_metric([iid], c.duplicates)
            fams["stale"].add_metric([iid], c.stale)
            gaps.add_metric([iid], c.gaps)
            dropped.add_metric([iid], c.dropped_entries)
        up = GaugeMetricFamily("kvctl_coordinator_instance_up",
                               "1 while an MP server heartbeats within the timeout",
                               labels=lab)
        now = time.time()
        for i in self.insts:
            up.add_metric([i.instance_id],
                          1.0 if now - i.last_heartbeat <= self.coord.timeout_s else 0.0)
        keys = GaugeMetricFamily("kvctl_coordinator_keys", "Keys in the directory")
        keys.add_metric([], self.counters["keys"])
        limit = GaugeMetricFamily("kvctl_coordinator_max_keys",
                                  "Most keys the directory holds (coordinator_max_keys)")
        limit.add_metric([], self.coord.store.max_keys)
        total_dropped = CounterMetricFamily(
            "kvctl_coordinator_key_limit_dropped_entries",
            "Store entries refused fleet-wide because the directory was full")
        total_dropped.add_metric([], self.counters["dropped_entries"])
        unreg = CounterMetricFamily("kvctl_coordinator_unregistered_batches",
                                    "Batches dropped: their instance was not registered")
        unreg.add_metric([], self.counters["unregistered"])
        evicted = CounterMetricFamily("kvctl_coordinator_evicted_instances",
                                      "MP servers deregistered by this coordinator for "
                                      "missing heartbeats")
        evicted.add_metric([], self.coord.evicted)
        yield from (seq, inc, gap, *fams.values(), gaps, dropped, up, keys, limit,
                    total_dropped, unreg, evicted)


def render(coord: Any, cursors: dict[str, Cursor], counters: dict[str, int],
           insts: list[Instance]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(coord, cursors, counters, insts))
    return generate_latest(registry)
