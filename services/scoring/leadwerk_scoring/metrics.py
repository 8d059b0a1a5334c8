"""Every metric of the scoring service, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leadwerk_platform.metrics import ConsumerMetrics, HttpMetrics


class ScoringMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        #: The stream processors' leadwerk_consumer_* (the same as every consumer group's).
        self.consumers = ConsumerMetrics(registry)
        #: leadwerk_scoring_http_* of the contacts API.
        self.http = HttpMetrics(registry, "leadwerk_scoring")
        self.events = Counter(
            "leadwerk_scoring_events_consumed_total",
            "Events a stream processor took in (including duplicates and skipped ones).",
            ["processor"], registry=registry)
        self.duplicates = Counter(
            "leadwerk_scoring_duplicate_events_total",
            "Redelivered events recognised by their event id and not applied again.",
            ["processor"], registry=registry)
        self.skipped = Counter(
            "leadwerk_scoring_skipped_events_total",
            "Tracking events kept out of timelines, by reason (bot, erased, unknown_contact, "
            "no_identity).", ["reason"], registry=registry)
        self.merges = Counter(
            "leadwerk_scoring_merges_total", "Contacts merged, by reason.", ["reason"],
            registry=registry)
        self.device_switches = Counter(
            "leadwerk_scoring_device_switches_total",
            "Shared devices that moved to another known contact instead of merging two.",
            registry=registry)
        self.points = Counter(
            "leadwerk_scoring_rule_matches_total", "Engagement rule matches that counted.",
            ["rule"], registry=registry)
        self.capped = Counter(
            "leadwerk_scoring_capped_matches_total", "Rule matches not counted (cap reached).",
            ["rule"], registry=registry)
        self.transitions = Counter(
            "leadwerk_scoring_stage_transitions_total", "Lifecycle transitions.",
            ["from_stage", "to_stage", "cause"], registry=registry)
        self.batch_seconds = Histogram(
            "leadwerk_scoring_batch_duration_seconds",
            "Time to process one batch including its outbox flush.", ["processor"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=registry)
        self.purged = Counter(
            "leadwerk_scoring_anonymous_events_purged_total",
            "Timeline events of never-identified visitors removed by the retention setting.",
            registry=registry)
        self.rescore_progress = Gauge(
            "leadwerk_scoring_rescore_contacts_done", "Contacts re-scored by the running "
            "re-score command.", registry=registry)
