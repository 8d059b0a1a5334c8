"""Every ingest metric, declared once (on a registry the app owns)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from leadwerk_platform.metrics import HTTP_BUCKETS, HttpMetrics


class IngestMetrics(HttpMetrics):
    """``leadwerk_ingest_http_*`` (requests by route, method and exact status, so alerts see 5xx
    and the 503 of backpressure apart) and the event counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "leadwerk_ingest")
        self.accepted = Counter(
            "leadwerk_ingest_events_accepted_total",
            "Events acknowledged by the broker, by event type.", ["type"], registry=registry)
        self.rejected = Counter(
            "leadwerk_ingest_events_rejected_total",
            "Events not produced, by reason.", ["reason"], registry=registry)
        self.produce_latency = Histogram(
            "leadwerk_ingest_produce_duration_seconds",
            "Time from handing a request's events to the producer until every ack.",
            buckets=HTTP_BUCKETS, registry=registry)
        # labels() takes a lock and builds a key on every call; children are cached instead.
        self._accepted_children: dict[str, Any] = {}

    def accepted_of(self, event_type: str) -> Any:
        child = self._accepted_children.get(event_type)
        if child is None:
            child = self._accepted_children[event_type] = self.accepted.labels(event_type)
        return child
