"""Every metric of the mailer, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from leadwerk_platform.metrics import ConsumerMetrics, HttpMetrics


class MailerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter("leadwerk_mailer_commands_total",
                                "Email commands consumed.", ["class"], registry=registry)
        self.duplicates = Counter("leadwerk_mailer_duplicate_commands_total",
                                  "Redelivered email commands recognised and not sent again.",
                                  registry=registry)
        self.outcomes = Counter("leadwerk_mailer_outcomes_total",
                                "Delivery outcomes (sent, deferred, bounced, failed, "
                                "suppressed).", ["state"], registry=registry)
        # Born at zero, so that rate() and increase() see the first bounce.
        for state in ("sent", "deferred", "bounced", "failed", "suppressed", "held"):
            self.outcomes.labels(state)
        self.consumers = ConsumerMetrics(registry)
        self.http = HttpMetrics(registry, "leadwerk_mailer")
