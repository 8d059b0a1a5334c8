"""Every metric of the crm-bridge, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queued = Counter("leadwerk_crm_deliveries_queued_total",
                              "Deliveries created from crm-commands.", registry=registry)
        self.attempts = Counter("leadwerk_crm_delivery_attempts_total",
                                "Delivery attempts by outcome (delivered, retry, dead).",
                                ["outcome"], registry=registry)
        self.inbound = Counter("leadwerk_crm_inbound_events_total",
                               "Inbound CRM events by result (accepted, duplicate, refused).",
                               ["result"], registry=registry)
