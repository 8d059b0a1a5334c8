"""Prometheus plumbing shared by the services (each declares its own metrics in its metrics.py).

Besides the registry and the ``/metrics`` route, two families every service has in the same
shape live here, so that one dashboard panel or alert covers all of them:

* :class:`HttpMetrics` and :class:`HttpMetricsMiddleware`: the RED metrics of a service's HTTP
  API, ``<prefix>_http_requests_total{route,method,status}`` and
  ``<prefix>_http_request_duration_seconds{route}``;
* :class:`ConsumerMetrics`: ``leadwerk_consumer_*`` of the Kafka consumer runtimes (plain
  aiokafka and faust), per consumer group and topic; lag per partition.

Naming follows Prometheus' conventions (``promtool check metrics`` passes; see
docs/decisions/0017-metrics-and-alerts.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Request latency buckets (seconds): ingest answers in milliseconds, admin APIs in tens of them.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Handler buckets (seconds): one batch of up to 500 records, database transaction included.
HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def new_registry() -> CollectorRegistry:
    """A registry per app instance (never the global one), with process and runtime metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


class HttpMetrics:
    """Requests by route template, method and status, and their latency by route.

    ``prefix`` is the service's metric prefix (``leadwerk_ingest``); the route label is the
    route's path template, so its values are as few as the routes."""

    def __init__(self, registry: CollectorRegistry, prefix: str,
                 buckets: tuple[float, ...] = HTTP_BUCKETS) -> None:
        self.requests = Counter(
            f"{prefix}_http_requests_total", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=registry)
        self.latency = Histogram(
            f"{prefix}_http_request_duration_seconds", "HTTP request latency by route.",
            ["route"], buckets=buckets, registry=registry)
        # labels() takes a lock and builds a key on every call; children are cached instead.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)), self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)


class HttpMetricsMiddleware:
    """ASGI middleware: counts requests and their latency, labelled by route template (low
    cardinality); a request no route matched counts as ``unmatched``."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics,
                 templates: dict[Any, str] | None = None) -> None:
        """``templates`` optionally maps endpoint callables to route paths, for routes that do
        not put themselves into the scope (filled once the routes exist)."""
        self.app = app
        self.metrics = metrics
        self.templates = templates if templates is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before it responded

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


class ConsumerMetrics:
    """The consumer runtimes' metrics, one instance per registry, shared by every consumer
    group of the process (:meth:`group` binds one group). Plain aiokafka consumers
    (:class:`~leadwerk_platform.kafka.consumer.ConsumerRuntime`) and faust stream processors
    (:class:`~leadwerk_platform.kafka.streams.StreamProcessor`) report the same names and
    labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge(
            "leadwerk_consumer_running",
            "1 while the consumer of a group runs in this process, 0 once it stopped.",
            ["group"], registry=registry)
        self.processed = Counter(
            "leadwerk_consumer_records_processed_total",
            "Records whose handler returned (their effects are durable), by group and topic.",
            ["group", "topic"], registry=registry)
        self.dead_lettered = Counter(
            "leadwerk_consumer_records_dead_lettered_total",
            "Records copied to their topic's dead-letter topic, by group and source topic.",
            ["group", "topic"], registry=registry)
        self.dead_letter_publishes = Counter(
            "leadwerk_consumer_dead_letter_publishes_total",
            "Attempts to publish a dead letter by outcome (published; failed, then retried).",
            ["group", "topic", "outcome"], registry=registry)
        self.handler_errors = Counter(
            "leadwerk_consumer_handler_errors_total",
            "Handler failures by kind: invalid (the record is dead-lettered), transient "
            "(retried with back-off), batch (the batch handler raised; its records went one "
            "by one).", ["group", "topic", "kind"], registry=registry)
        self.handler_duration = Histogram(
            "leadwerk_consumer_handler_duration_seconds",
            "Time to handle one batch until its effects were durable: the records of one "
            "fetched partition (plain consumers) or one stream batch (faust, observed under "
            "each topic it held).", ["group", "topic"], buckets=HANDLER_BUCKETS,
            registry=registry)
        self.lag = Gauge(
            "leadwerk_consumer_lag_records",
            "Records on a partition assigned to this process that the group has not "
            "committed yet (end offset minus committed offset), measured periodically.",
            ["group", "topic", "partition"], registry=registry)

    def group(self, group: str) -> GroupMetrics:
        return GroupMetrics(self, group)


class GroupMetrics:
    """:class:`ConsumerMetrics` bound to one consumer group, with the label children cached
    (cheap enough for the hot path: a dict lookup and an increment per batch)."""

    def __init__(self, metrics: ConsumerMetrics, group: str) -> None:
        self._metrics = metrics
        self.group = group
        self._children: dict[tuple[int | str, ...], Any] = {}
        self._lag_series: set[tuple[str, str]] = set()

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key: tuple[int | str, ...] = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.group, *labels)
        return child

    def declare(self, topics: Iterable[str]) -> None:
        """Export the record counters at 0 from the start, so that ``increase()`` sees the
        first dead letter (a series born at 1 shows no increase); the handler duration too,
        so every group shows the same series before its first batch."""
        for topic in topics:
            self._child(self._metrics.processed, topic)
            self._child(self._metrics.dead_lettered, topic)
            self._child(self._metrics.handler_duration, topic)

    def processed(self, topic: str, count: int = 1) -> None:
        self._child(self._metrics.processed, topic).inc(count)

    def dead_lettered(self, topic: str) -> None:
        self._child(self._metrics.dead_lettered, topic).inc()

    def dead_letter_publish(self, topic: str, outcome: str) -> None:
        self._child(self._metrics.dead_letter_publishes, topic, outcome).inc()

    def handler_error(self, topic: str, kind: str) -> None:
        self._child(self._metrics.handler_errors, topic, kind).inc()

    def handled(self, topic: str, seconds: float) -> None:
        self._child(self._metrics.handler_duration, topic).observe(seconds)

    def set_running(self, running: bool) -> None:
        self._metrics.running.labels(self.group).set(1 if running else 0)

    def set_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace this group's lag series with ``lags`` ((topic, partition) → records): a
        partition that moved to another member stops being reported here."""
        series = {(topic, str(partition)): lag for (topic, partition), lag in lags.items()}
        for topic, partition in self._lag_series - series.keys():
            self._metrics.lag.remove(self.group, topic, partition)
        for (topic, partition), lag in series.items():
            self._metrics.lag.labels(self.group, topic, partition).set(lag)
        self._lag_series = set(series)
