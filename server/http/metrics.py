"""Request latency of the HTTP apps, as a Prometheus histogram.

Labels stay bounded whatever clients send: the route is the matched route's template
(``/events/{event_id}``, never the id), anything unmatched is ``other``; the method is one
of the standard ones or ``other``; the status is its class (``2xx``).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Histogram

from kvctl.server.http.limits import ASGIApp, Message, Receive, Scope, Send

# a scope key set by handlers that answer before FastAPI routes (the worker command API)
ROUTE_KEY = "kvctl.route"
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
# from a loopback acknowledgement (sub-millisecond) to a long completion
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)


class RequestMetrics:
    """The request histogram of one process part (controller with its monitor, a worker, an
    engine); each /metrics shows the part it belongs to, so nothing is counted twice."""

    def __init__(self) -> None:
        self.latency = Histogram(
            "kvctl_http_request_duration_seconds",
            "HTTP request latency, from the first byte in to the last byte out",
            labelnames=["app", "route", "method", "code"], buckets=BUCKETS, registry=None)

    def observe(self, app: str, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get(ROUTE_KEY)
        if route is None:
            matched = scope.get("route")
            route = getattr(matched, "path", None) or "other"
        method = scope.get("method", "")
        self.latency.labels(app, route, method if method in METHODS else "other",
                            f"{status // 100}xx").observe(seconds)


class TimeRequests:
    """ASGI middleware: time every HTTP request into ``metrics`` under ``name``."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics, name: str) -> None:
        self.app = app
        self.metrics = metrics
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        t0 = time.perf_counter()

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            self.metrics.observe(self.name, scope, status, time.perf_counter() - t0)


def install_request_metrics(app: Any, name: str, metrics: RequestMetrics | None = None
                            ) -> RequestMetrics:
    """Time ``app``'s requests (outermost, so refusals by the guards count too) into
    ``metrics`` (a new one unless shared) and keep it as ``app.state.request_metrics``.
    Call after `install_guards`."""
    metrics = metrics or RequestMetrics()
    app.state.request_metrics = metrics
    app.add_middleware(TimeRequests, metrics=metrics, name=name)
    return metrics
