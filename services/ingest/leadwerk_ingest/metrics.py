"""Every ingest metric, declared once (on a registry the app owns)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "leadwerk_ingest_http_requests_total", "HTTP requests by route and status.",
            ["route", "method", "status"], registry=registry)
        self.latency = Histogram(
            "leadwerk_ingest_http_request_duration_seconds", "HTTP request latency by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.accepted = Counter(
            "leadwerk_ingest_events_accepted_total",
            "Events acknowledged by the broker, by event type.", ["type"], registry=registry)
        self.rejected = Counter(
            "leadwerk_ingest_events_rejected_total",
            "Events not produced, by reason.", ["reason"], registry=registry)
        self.produce_latency = Histogram(
            "leadwerk_ingest_produce_duration_seconds",
            "Time from handing a request's events to the producer until every ack.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        # labels() takes a lock and builds a key on every call; children are cached instead.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._accepted_children: dict[str, Any] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)), self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def accepted_of(self, event_type: str) -> Any:
        child = self._accepted_children.get(event_type)
        if child is None:
            child = self._accepted_children[event_type] = self.accepted.labels(event_type)
        return child


class MetricsMiddleware:
    """Counts requests and their latency, labelled by route template (low cardinality)."""

    def __init__(self, app: ASGIApp, metrics: IngestMetrics,
                 templates: dict[Any, str]) -> None:
        """``templates`` maps endpoint callables to route paths (filled once routes exist)."""
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route: Any = scope.get("route")
            template = (getattr(route, "path", None) or self.templates.get(scope.get("endpoint"))
                        or "unmatched")
            self.metrics.observe_request(template, scope["method"], status,
                                         time.perf_counter() - start)
