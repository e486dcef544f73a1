"""The shipped Grafana dashboard and Prometheus alert rules name only metrics (and labels)
that real kvctl processes export, and a `kvctl worker` publishes its own codec and tier
counters.

Scraped on loopback: `kvctl serve --model none` (controller + embedded worker, monitor port),
`kvctl worker --model none` (a worker port, after a real compress through the controller) and
the engine port of a `kvctl worker` whose model cannot load (the engine serves its /metrics
whatever the model does; loading SmolLM2 here would only cost time).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_procs import _ok, _spawn, start_worker, wait_event, wait_for, workers
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "kvctl.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# labels Prometheus itself adds to every scraped series, and the histogram bucket label
TARGET_LABELS = {"instance", "job", "le"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset"}
CHUNK = 256


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict]) -> Iterator[str]:
        for p in panels:
            for t in p.get("targets", []):
                yield t["expr"]
            yield from walk(p.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bkvctl_[a-zA-Z0-9_]+", expr))


def labels_in(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    found: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        found |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        found |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    # Grafana's {{label}} legends are not in expr; $__rate_interval is [..], not {..}
    return found - PROMQL_WORDS


def exported(*urls: str) -> dict[str, set[str]]:
    """Sample name -> label names, over the /metrics of every URL."""
    out: dict[str, set[str]] = {}
    for url in urls:
        r = httpx.get(url + "/metrics", timeout=10)
        assert r.status_code == 200, (url, r.text[:300])
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out.setdefault(s.name, set()).update(s.labels)
    return out


def sample(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def put_raw_chunk(worker: str, tokens: list[int]) -> None:
    """One real raw chunk for ``tokens`` in the worker's memory tier, as the engine stores."""
    import torch

    from kvctl.codecs import get_codec
    from kvctl.server.chunks import chunk_refs
    from kvctl.server.controller.transport import CHECKSUM_HEADER, NUM_TOKENS_HEADER
    from kvctl.server.worker.jobs import checksum

    (ref,) = chunk_refs(tokens, CHUNK)
    kv = torch.randn(2, 2, ref.num_tokens, 2, 32, generator=torch.Generator().manual_seed(3))
    blob = get_codec("raw").encode(kv.to(torch.float16))
    r = httpx.put(f"{worker}/worker/chunks/LocalCPUBackend/{ref.key}", content=blob,
                  headers={NUM_TOKENS_HEADER: str(ref.num_tokens),
                           CHECKSUM_HEADER: checksum(blob)}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("dash")
    port, monitor = free_port(), free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"heartbeat_interval_s": 0.3, "dead_after_s": 3.0}))
    serve = _spawn("serve", ["serve", "--config", str(cfg), "--model", "none",
                             "--port", str(port), "--monitor-port", str(monitor)], tmp)
    procs = [serve]
    try:
        api, mon = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{monitor}"
        wait_for(lambda: _ok(mon + "/healthz"), 90, "kvctl serve did not start", serve)
        worker = start_worker(tmp, "dash-worker", [mon], model="none")
        procs.append(worker)
        (tmp / "no-model").mkdir()
        engine = start_worker(tmp, "dash-engine", [mon], model=str(tmp / "no-model"))
        procs.append(engine)
        wait_for(lambda: {"dash-worker", "dash-engine"} <= workers(api).keys(), 90,
                 "the workers did not register", *procs)
        wait_for(lambda: _ok(engine.urls["engine"] + "/metrics"), 90,
                 "the engine port did not answer", engine)
        yield {"api": api, "monitor": mon, "worker": worker.urls["worker"],
               "engine": engine.urls["engine"]}
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_worker_publishes_its_codec_and_tier_counters(cluster: dict[str, str]) -> None:
    tokens = list(range(100, 100 + CHUNK))
    put_raw_chunk(cluster["worker"], tokens)
    r = httpx.post(cluster["api"] + "/compress", json={
        "instance_id": "dash-worker", "method": "cachegen", "location": "LocalCPUBackend",
        "tokens": tokens}, timeout=30)
    assert r.status_code == 200, r.text
    assert wait_event(cluster["api"], r.json()["event_id"])["status"] == "finished"
    w = cluster["worker"]
    assert sample(w, "kvctl_codec_chunks_total", op="compress", method="cachegen") == 1
    assert sample(w, "kvctl_codec_duration_seconds_count", op="compress", method="cachegen") == 1
    assert sample(w, "kvctl_codec_duration_seconds_sum", op="compress", method="cachegen") > 0
    assert sample(w, "kvctl_store_codec_bytes", location="LocalCPUBackend", codec="cachegen") > 0
    assert sample(w, "kvctl_events_total", op="compress", status="finished") == 1
    for table in ("hits", "misses", "read_failures", "evictions"):
        assert sample(w, f"kvctl_tier_{table}_total", location="LocalCPUBackend") == 0
    assert sample(w, "kvctl_worker_registered") == 1
    assert sample(w, "kvctl_worker_heartbeats_total", result="ok") >= 1
    # the worker's requests, by route template, never by key or id
    assert sample(w, "kvctl_http_request_duration_seconds_count", app="worker",
                  route="/worker/chunks/{location}/{key}", method="PUT", code="2xx") == 1
    # the controller's view of the same worker
    assert sample(cluster["monitor"], "kvctl_worker_up", instance_id="dash-worker") == 1


def test_every_dashboard_and_alert_expression_names_exported_metrics(
        cluster: dict[str, str]) -> None:
    # traffic on each app first, so that labelled histograms have their series
    for base in (cluster["api"], cluster["monitor"], cluster["worker"], cluster["engine"]):
        httpx.get(base + "/metrics", timeout=10)
    have = exported(cluster["monitor"], cluster["worker"], cluster["engine"])
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 20
    problems = []
    for expr in exprs:
        names = names_in(expr)
        if not names:
            problems.append(f"names no kvctl metric: {expr}")
        if missing := sorted(n for n in names if n not in have):
            problems.append(f"not exported: {missing} in {expr}")
        known = set().union(*(have.get(n, set()) for n in names)) | TARGET_LABELS
        if unknown := sorted(labels_in(expr) - known):
            problems.append(f"labels {unknown} on none of {sorted(names)}: {expr}")
    assert problems == []


def test_the_check_finds_a_wrong_name() -> None:
    """The comparison above can fail: a misspelt metric or label is reported."""
    assert names_in("rate(kvctl_tier_hit_total[5m])") == {"kvctl_tier_hit_total"}
    assert labels_in('sum by (tier) (kvctl_store_bytes{codec="x"})') == {"tier", "codec"}
    assert labels_in("rate(kvctl_tier_hits_total[$__rate_interval])") == set()
