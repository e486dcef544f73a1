"""Malformed requests against every endpoint of the real stack: never a 5xx, always a detail.

Each example takes a valid body of an endpoint and breaks it (a field replaced by any JSON
value: huge or negative numbers, NaN, lone surrogates, deep nesting, wrong types; a field
dropped; the whole body replaced), then sends it over a real socket to the uvicorn servers
of ``tests/test_hardening_server.py``'s stack.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_hardening_server import INSTANCE, stack  # noqa: F401 (fixture)

POS = [INSTANCE, "LocalCPUBackend"]
CONTROLLER = {
    "/compress": {"instance_id": INSTANCE, "method": "cachegen", "location": "LocalCPUBackend",
                  "tokens": [1, 2, 3]},
    "/decompress": {"instance_id": INSTANCE, "method": "cachegen",
                    "location": "LocalCPUBackend", "tokens": [1, 2, 3]},
    "/lookup": {"tokens": [1, 2, 3]},
    "/clear": {"instance_id": INSTANCE, "location": "LocalDiskBackend"},
    "/pin": {"instance_id": INSTANCE, "location": "LocalCPUBackend", "tokens": [1, 2, 3]},
    "/unpin": {"instance_id": INSTANCE, "location": "LocalCPUBackend", "tokens": [1, 2, 3]},
    "/move": {"old_position": POS, "new_position": [INSTANCE, "LocalDiskBackend"],
              "tokens": [1, 2, 3], "should_copy": True},
    "/health": {"instance_id": INSTANCE},
    "/query_worker_info": {"instance_id": INSTANCE, "worker_ids": [0]},
    "/check_finish": {"event_id": "compress-0"},
}
ENGINE = {
    "/v1/completions": {"prompt": "Hello", "max_tokens": 1, "temperature": 0.0, "top_p": 1.0,
                        "stop": ["\n"], "seed": 1, "n": 1, "stream": False},
    "/tokenize": {"prompt": "Hello", "add_special_tokens": True, "return_token_strs": True},
    "/detokenize": {"tokens": [1, 2, 3]},
}

surrogates = st.sampled_from(["\ud800", "\udfff", "a\udc00b"])
scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**80), max_value=2**80)
           | st.sampled_from([2**63, 2**64, -(2**63) - 1, 2**31, -1, 0, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | surrogates)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                           max_leaves=20)
nested = st.integers(min_value=1, max_value=3000).map(lambda d: "[" * d + "]" * d)


@st.composite
def broken(draw, bodies: dict[str, dict]) -> tuple[str, str]:
    path = draw(st.sampled_from(sorted(bodies)))
    body = dict(bodies[path])
    how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "whole", "nested"]))
    if how == "replace":
        key = draw(st.sampled_from(sorted(body)))
        body[key] = draw(json_values)
        # keep a generation short: a *valid* max_tokens becomes 1
        if key == "max_tokens" and type(body[key]) is int and 0 <= body[key] <= 4096:
            body[key] = 1
        return path, json.dumps(body)
    if how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
        return path, json.dumps(body)
    if how == "nested":
        key = draw(st.sampled_from(sorted(body)))
        text = json.dumps({k: v for k, v in body.items() if k != key})
        return path, text[:-1] + f', "{key}": {draw(nested)}' + "}"
    return path, json.dumps(draw(json_values))


# one client for every example: creating one per request (its TLS context) costs more than
# the request itself
HTTP = httpx.Client(timeout=120)


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert detail, (what, r.text[:500])


FUZZ = settings(max_examples=500, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(case=broken(CONTROLLER))
def test_controller_never_answers_5xx(stack, case):  # noqa: F811
    path, body = case
    r = HTTP.post(stack.controller + path, content=body,
                  headers={"content-type": "application/json"})
    _check(r, f"{path} {body[:300]}")


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=broken(ENGINE))
def test_engine_never_answers_5xx(stack, case):  # noqa: F811
    path, body = case
    r = HTTP.post(stack.engine + path, content=body,
                  headers={"content-type": "application/json"})
    _check(r, f"{path} {body[:300]}")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(status=st.one_of(st.none(), st.text(max_size=30) | surrogates),
       limit=st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.text(max_size=10)),
       event_id=st.text(max_size=60) | surrogates)
def test_event_views_never_answer_5xx(stack, status, limit, event_id):  # noqa: F811
    def pct(value: object) -> str:
        # surrogates go out as the (invalid) UTF-8 bytes they would have: the server must
        # cope with a query or path that does not decode
        return quote(str(value).encode("utf-8", "surrogatepass"), safe="")

    query = "&".join(f"{k}={pct(v)}" for k, v in (("status", status), ("limit", limit))
                     if v is not None)
    for base in (stack.controller, stack.monitor):
        _check(HTTP.get(f"{base}/events?{query}"), f"/events?{query}")
        _check(HTTP.get(f"{base}/events/{pct(event_id)}"), f"/events/{event_id!r}")


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null", b"[]", b'{"tokens": NaN}',
                                 b'{"tokens": [1e999]}', b'{"tokens": [1.5]}',
                                 b'{"tokens": "1,2,3"}', b"[" * 5000 + b"]" * 5000])
def test_unparseable_bodies_are_4xx(stack, raw):  # noqa: F811
    for base, paths in ((stack.controller, CONTROLLER), (stack.engine, ENGINE)):
        for path in paths:
            r = HTTP.post(base + path, content=raw, headers={"content-type": "application/json"})
            _check(r, f"{path} {raw[:40]!r}")
