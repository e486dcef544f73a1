"""The controller's per-worker series: one per (instance, worker), as an LMCache fleet's
instance has one worker per rank (the same labels twice would be an invalid exposition)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvctl.server.controller.metrics import render_controller_metrics


def view(iid: str, wid: int, state: str) -> dict:
    return {"instance_id": iid, "worker_id": wid, "state": state, "heartbeat_age_s": 1.5,
            "locations": [{"location": "LocalCPUBackend", "chunks": 3, "bytes": 300}]}


def test_two_workers_of_one_instance_are_two_series() -> None:
    text = render_controller_metrics(None, [view("fleet", 0, "alive"), view("fleet", 1, "dead"),
                                            view("solo", 0, "alive")]).decode()
    samples = [(s.name, tuple(sorted(s.labels.items())), s.value)
               for fam in text_string_to_metric_families(text) for s in fam.samples]
    up = {dict(lab)["instance_id"] + "/" + dict(lab)["worker_id"]: v
          for name, lab, v in samples if name == "kvctl_worker_up"}
    assert up == {"fleet/0": 1.0, "fleet/1": 0.0, "solo/0": 1.0}
    chunks = [lab for name, lab, _ in samples if name == "kvctl_worker_chunks"]
    assert len(chunks) == len(set(chunks)) == 3
    states = {dict(lab)["state"]: v for name, lab, v in samples if name == "kvctl_workers"}
    assert states == {"alive": 2.0, "dead": 1.0}
    # every series name appears once per label set
    keys = [(name, lab) for name, lab, _ in samples]
    assert len(keys) == len(set(keys))
