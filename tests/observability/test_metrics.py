"""Every service's ``/metrics`` after real traffic: Prometheus naming (``promtool check
metrics``), the consumer metrics every group reports alike, ingest's status labels."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import INSTRUMENTED_GROUPS, SERVICES, Scrapes
from .promql import SYNTHETIC, committed_dashboards, dashboard_exprs, metric_names, rule_exprs

pytestmark = pytest.mark.integration

CONSUMER_FAMILIES = {
    "leadwerk_consumer_running": {"group"},
    "leadwerk_consumer_records_processed": {"group", "topic"},
    "leadwerk_consumer_records_dead_lettered": {"group", "topic"},
    "leadwerk_consumer_handler_duration_seconds": {"group", "topic"},
    "leadwerk_consumer_lag_records": {"group", "topic", "partition"},
}


@pytest.mark.parametrize("service", SERVICES)
def test_metrics_pass_promtool_check_metrics(scrapes: Scrapes, promtool: str,
                                             service: str) -> None:
    text = scrapes.text[service]
    assert "leadwerk_" in text  # the service's own metrics are there, not only the process'
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=60, check=False)
    complaints = (result.stdout + result.stderr).decode().strip()
    assert not complaints, f"{service}: {complaints}"
    assert result.returncode == 0


@pytest.mark.parametrize("service", sorted(INSTRUMENTED_GROUPS))
def test_every_consumer_group_reports_the_same_metrics(scrapes: Scrapes, service: str) -> None:
    """Plain aiokafka groups and faust processors alike: one dashboard panel covers all."""
    exposition = scrapes.parsed(service)
    for group in INSTRUMENTED_GROUPS[service]:
        group_id = scrapes.prefix + group
        assert exposition.value("leadwerk_consumer_running", group=group_id) == 1
        for family in exposition.families:
            if family.name in CONSUMER_FAMILIES:
                mine = [s for s in family.samples if s.labels.get("group") == group_id]
                assert mine, f"{family.name} has nothing for {group_id}"
                for sample in mine:
                    labels = set(sample.labels) - {"le"}
                    assert labels == CONSUMER_FAMILIES[family.name], sample
        lags = [s for s in exposition.samples
                if s.name == "leadwerk_consumer_lag_records" and s.labels["group"] == group_id]
        assert all(s.value >= 0 and s.labels["partition"].isdigit() for s in lags)


def test_dead_letters_are_counted_per_group_and_source_topic(scrapes: Scrapes) -> None:
    for service, group in (("scoring", "scoring.scorer"), ("workflow", "workflow.engine"),
                           ("crm-bridge", "crm-bridge.sync")):
        exposition = scrapes.parsed(service)
        where = {"group": scrapes.prefix + group, "topic": f"{scrapes.prefix}contact-events"}
        assert exposition.value("leadwerk_consumer_records_dead_lettered_total", **where) >= 1
        assert exposition.value("leadwerk_consumer_dead_letter_publishes_total",
                                outcome="published", **where) >= 1
        assert exposition.value("leadwerk_consumer_handler_errors_total", kind="invalid",
                                **where) >= 1


def test_ingest_counts_requests_by_route_and_exact_status(scrapes: Scrapes) -> None:
    """Alerts tell 5xx from the 503 of backpressure by the status label."""
    ingest = scrapes.parsed("ingest")
    for status in ("200", "400"):
        assert ingest.value("leadwerk_ingest_http_requests_total", route="/v1/track",
                            method="POST", status=status) >= 1
    assert ingest.value("leadwerk_ingest_http_requests_total", route="/f/{form_id}",
                        status="303") >= 1


@pytest.mark.parametrize(("service", "prefix"), [("scoring", "leadwerk_scoring"),
                                                 ("workflow", "leadwerk_workflow"),
                                                 ("mailer", "leadwerk_mailer"),
                                                 ("crm-bridge", "leadwerk_crm")])
def test_apis_count_requests_by_route_template(scrapes: Scrapes, service: str,
                                               prefix: str) -> None:
    exposition = scrapes.parsed(service)
    routes = {s.labels["route"] for s in exposition.samples
              if s.name == f"{prefix}_http_requests_total"}
    assert "unmatched" in routes  # /api/nothing-here: one label value, not one per path
    assert all(r == "unmatched" or r.startswith("/") for r in routes), routes
    assert exposition.value(f"{prefix}_http_request_duration_seconds_count") >= 1


def test_every_metric_the_alerts_and_dashboards_use_is_exposed(scrapes: Scrapes) -> None:
    """A renamed metric fails here, not silently in an empty panel or a never-firing alert."""
    exposed = scrapes.names()
    used = {("rule", name) for expr in rule_exprs() for name in metric_names(expr)}
    used |= {(board, name) for board, dashboard in committed_dashboards().items()
             for expr in dashboard_exprs(dashboard) for name in metric_names(expr)}
    assert len({name for _, name in used}) > 40  # the extraction finds what is there
    missing = sorted((where, name) for where, name in used
                     if name not in exposed and name not in SYNTHETIC)
    assert not missing, missing


def test_metric_names_are_told_from_functions_labels_and_durations() -> None:
    expr = ('histogram_quantile(0.95, sum by (group, le) (rate(a_seconds_bucket{job="x", '
            'instance=~"$instance"}[5m]))) / on(group) group_left sum(b_total offset 1h) '
            'and deriv(sum by (job) (c)[15m:1m]) > 1e3 unless up')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "up"}
