"""The shipped Grafana dashboard and Prometheus alert rules name only metrics (and labels)
that real kvctl processes export, and a `kvctl worker` publishes its own codec and tier
counters.

Scraped on loopback: `kvctl serve --model none --coordinator-port` (controller + embedded
worker on the monitor port; the MP coordinator, fed one registration and one event batch as an
LMCache MP server sends them), `kvctl worker --model none` (a worker port, after a real
compress through the controller) and the engine port of a `kvctl worker` whose model cannot
load (the engine serves its /metrics whatever the model does; loading SmolLM2 here would only
cost time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_procs import _ok, spawn, start_worker, wait_event, wait_for, workers
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


def feed_coordinator(coord: str) -> None:
    """What an LMCache MP server sends first: its registration, then a batch of stores."""
    r = httpx.post(coord + "/instances", json={"instance_id": "mp-a", "ip": "127.0.0.1",
                                               "http_port": free_port()}, timeout=10)
    assert r.status_code == 200, r.text
    key = {"chunk_hash_hex": "ab" * 16, "model_name": "m", "kv_rank": 16777472,
           "object_group_id": 0, "cache_salt": ""}
    r = httpx.post(coord + "/events", json={"batches": [{
        "instance_id": "mp-a", "incarnation": 1, "seq": 1, "event_type": "store",
        "tier": "l1", "backend": "dram", "entries": [
            {"key": key, "size_bytes": 100, "token_ids": [], "token_offset": -1}]}]},
        timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("dash")
    port, monitor, coord_port = free_port(), free_port(), free_port()
    cfg = tmp / "serve.yaml"
    # the MP server registered below never heartbeats: it stays registered for the test
    cfg.write_text(yaml.safe_dump({"heartbeat_interval_s": 0.3, "dead_after_s": 3.0,
                                   "coordinator_instance_timeout_s": 600}))
    serve = spawn("serve", ["serve", "--config", str(cfg), "--model", "none",
                             "--port", str(port), "--monitor-port", str(monitor),
                             "--coordinator-port", str(coord_port)], tmp)
    procs = [serve]
    try:
        api, mon = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{monitor}"
        coord = f"http://127.0.0.1:{coord_port}"
        wait_for(lambda: _ok(mon + "/healthz") and _ok(coord + "/healthz"), 90,
                 "kvctl serve did not start", serve)
        feed_coordinator(coord)
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
               "engine": engine.urls["engine"], "coordinator": coord}
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
    have = exported(cluster["monitor"], cluster["worker"], cluster["engine"],
                    cluster["coordinator"])
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


def prometheus_tool(name: str) -> str:
    """``promtool`` or ``prometheus``: on PATH, or KVCTL_PROMTOOL / KVCTL_PROMETHEUS (.ci/run
    installs both, from Debian's prometheus package, as root)."""
    found = os.environ.get(f"KVCTL_{name.upper()}") or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (Debian: the prometheus package)")
    return found


def promtool() -> str:
    return prometheus_tool("promtool")


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """Prometheus parses the alert rules, and every dashboard query as a recording rule."""
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # Grafana's $__rate_interval is a duration the server fills in
    rules = [{"record": f"kvctl:dashboard:{i}", "expr": e.replace("$__rate_interval", "5m")}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout + r.stderr


def test_alerts_fire_on_the_series_they_are_for(tmp_path: Path) -> None:
    """promtool's rule tests: a worker silent past `for` fires KvctlWorkerDead; one that
    comes back clears it; a tier that keeps failing reads fires KvctlTierReadFailures."""
    tool = promtool()
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    worker = {"instance_id": "a", "worker_id": "0"}
    tier = {"instance": "node1:8100", "location": "RemoteBackend"}

    def fired(name: str, labels: dict[str, str]) -> dict:
        notes = {k: v.replace("{{ $labels.instance_id }}", labels.get("instance_id", ""))
                 .replace("{{ $labels.worker_id }}", labels.get("worker_id", ""))
                 .replace("{{ $labels.instance }}", labels.get("instance", ""))
                 .replace("{{ $labels.location }}", labels.get("location", ""))
                 for k, v in rules[name]["annotations"].items()}
        return {"exp_labels": {**labels, **rules[name]["labels"]}, "exp_annotations": notes}

    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'kvctl_worker_up{instance_id="a",worker_id="0"}',
             "values": "1 0 0 0 1 1"},
            {"series": 'kvctl_tier_read_failures_total{instance="node1:8100",'
                       'location="RemoteBackend"}', "values": "0+10x12"}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "KvctlWorkerDead", "exp_alerts": []},  # pending
            {"eval_time": "3m", "alertname": "KvctlWorkerDead",
             "exp_alerts": [fired("KvctlWorkerDead", worker)]},
            {"eval_time": "5m", "alertname": "KvctlWorkerDead", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "KvctlTierReadFailures",
             "exp_alerts": [fired("KvctlTierReadFailures", tier)]}]}]}
    path = tmp_path / "alerts.test.yml"
    path.write_text(yaml.safe_dump(spec))
    r = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_finds_a_wrong_name() -> None:
    """The comparison above can fail: a misspelt metric or label is reported."""
    assert names_in("rate(kvctl_tier_hit_total[5m])") == {"kvctl_tier_hit_total"}
    assert labels_in('sum by (tier) (kvctl_store_bytes{codec="x"})') == {"tier", "codec"}
    assert labels_in("rate(kvctl_tier_hits_total[$__rate_interval])") == set()


def query(prom: str, expr: str) -> dict:
    return httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()


def test_prometheus_evaluates_every_expression_on_real_scrapes(cluster: dict[str, str],
                                                               tmp_path: Path) -> None:
    """A real Prometheus scrapes the four ports, loads the alert rules and answers every
    dashboard query without an error; the cluster's basic series are there."""
    exe = prometheus_tool("prometheus")
    port = free_port()
    hostport = {k: cluster[k].removeprefix("http://")
                for k in ("monitor", "worker", "engine", "coordinator")}
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": f"kvctl-{k}", "static_configs": [{"targets": [v]}]}
                           for k, v in hostport.items()]}))
    log = tmp_path / "prometheus.log"
    with log.open("w") as f:
        proc = subprocess.Popen([exe, f"--config.file={cfg}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=f, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        def scraped_thrice() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log.read_text()[-2000:]}")
            try:
                r = query(prom, "min(count_over_time(up[1m])) >= 3 and min(up) == 1")
            except httpx.HTTPError:
                return False
            return bool(r.get("data", {}).get("result")) and \
                len(query(prom, "up")["data"]["result"]) == len(hostport)

        wait_for(scraped_thrice, 60, "prometheus did not scrape the four ports")
        problems = []
        for expr in dashboard_exprs() + alert_exprs():
            r = query(prom, expr.replace("$__rate_interval", "1m"))
            if r.get("status") != "success":
                problems.append(f"{r.get('error')}: {expr}")
        assert problems == []
        for expr in ("kvctl_worker_up", "sum by (state) (kvctl_workers)",
                     "sum by (app) (rate(kvctl_http_request_duration_seconds_count[1m]))",
                     "sum by (location, codec) (kvctl_store_codec_bytes)",
                     "kvctl_engine_running", "kvctl_worker_registered",
                     "kvctl_coordinator_instance_up", "kvctl_coordinator_keys"):
            assert query(prom, expr)["data"]["result"], expr

        def rules_evaluated() -> list[dict] | None:
            groups = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = wait_for(rules_evaluated, 30, "prometheus did not evaluate the alert rules")
        assert len(rules) == len(alert_exprs())
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    finally:
        proc.terminate()
        proc.wait(30)
