"""Every metric of the crm-bridge, declared once."""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leadwerk_crm_bridge.config import Connector
from leadwerk_platform.metrics import ConsumerMetrics, HttpMetrics


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        #: The deliveries and sync consumers' leadwerk_consumer_*.
        self.consumers = ConsumerMetrics(registry)
        #: leadwerk_crm_http_* of the connector API and the inbound webhooks.
        self.http = HttpMetrics(registry, "leadwerk_crm")
        self.queued = Counter("leadwerk_crm_deliveries_queued_total",
                              "Deliveries created, by what they sync (handoff, lifecycle, "
                              "score, activity, profile, erasure, webhook).", ["kind"],
                              registry=registry)
        self.attempts = Counter("leadwerk_crm_delivery_attempts_total",
                                "Requests (one per batch) by connector kind and outcome "
                                "(delivered, retry, dead, circuit_open).",
                                ["connector", "outcome"], registry=registry)
        # At 0 from the start: the dead-letter alert's increase() sees the first dead batch.
        for kind in get_args(Connector.model_fields["kind"].annotation):
            self.attempts.labels(kind, "dead")
        self.delivered = Counter("leadwerk_crm_deliveries_delivered_total",
                                 "Deliveries that arrived, by connector kind.", ["connector"],
                                 registry=registry)
        self.latency = Histogram("leadwerk_crm_request_duration_seconds",
                                 "Time to deliver one batch, by connector kind.",
                                 ["connector"], registry=registry)
        self.circuit_open = Gauge("leadwerk_crm_circuit_open",
                                  "1 while the circuit breaker of an endpoint is open.",
                                  ["endpoint"], registry=registry)
        self.inbound = Counter("leadwerk_crm_inbound_events_total",
                               "Inbound CRM events by source and result (accepted, "
                               "duplicate, ignored, refused).", ["source", "result"],
                               registry=registry)
