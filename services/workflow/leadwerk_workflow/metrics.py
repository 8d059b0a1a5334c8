"""Every metric of the workflow service, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from leadwerk_platform.metrics import ConsumerMetrics, HttpMetrics


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        #: The engine consumer's leadwerk_consumer_*.
        self.consumers = ConsumerMetrics(registry)
        #: leadwerk_workflow_http_* of the journeys API.
        self.http = HttpMetrics(registry, "leadwerk_workflow")
        self.enrolled = Counter("leadwerk_workflow_enrollments_total",
                                "Contacts that entered a journey.", ["journey"],
                                registry=registry)
        self.steps = Counter("leadwerk_workflow_steps_total", "Journey steps executed.",
                             ["action"], registry=registry)
        self.commands = Counter("leadwerk_workflow_commands_total",
                                "Commands sent through the outbox.", ["kind"],
                                registry=registry)
        self.timers = Counter("leadwerk_workflow_timers_fired_total",
                              "Durable timers that fell due and were handled.",
                              ["outcome"], registry=registry)
        self.events = Counter("leadwerk_workflow_events_consumed_total",
                              "Contact events and changes consumed.", ["type"],
                              registry=registry)
