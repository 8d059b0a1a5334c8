"""Every metric of the mailer, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


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
