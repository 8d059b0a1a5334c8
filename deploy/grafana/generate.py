"""Writes Leadwerk's Grafana dashboards: overview.json and one per service.

    uv run python deploy/grafana/generate.py           # rewrite the JSON files
    uv run python deploy/grafana/generate.py --check   # exit 1 if a file is not up to date

The JSON is committed (kustomize turns it into ConfigMaps, see kustomization.yaml);
tests/observability checks that it matches this script, that every expression parses and that
every metric it names exists. Panels are timeseries and stat panels on a Prometheus data source
chosen by the ``datasource`` variable; the per-service dashboards select ``job="leadwerk-<name>"``
(the ServiceMonitor's job label) and an ``instance`` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.4 / 11
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
GRID_WIDTH = 24


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    unit: str = "short"
    width: int = 12
    height: int = 8
    stacked: bool = False
    bars: bool = False


def series(title: str, *targets: Target, **options: Any) -> Panel:
    return Panel(title, targets, kind="timeseries", **options)


def stat(title: str, *targets: Target, **options: Any) -> Panel:
    return Panel(title, targets, kind="stat", **{"width": 6, "height": 4, **options})


@dataclass(frozen=True)
class Service:
    """What a service's dashboard shows besides its process: HTTP RED metrics under
    ``http_prefix`` (None: the service exports none yet), consumer RED metrics when it has
    consumer groups, and its own panels."""

    name: str
    title: str
    http_prefix: str | None
    consumers: bool
    panels: tuple[Panel, ...] = field(default=())

    @property
    def job(self) -> str:
        return f"leadwerk-{self.name}"

    @property
    def selector(self) -> str:
        return selector(self.name)


def selector(service: str) -> str:
    """The label matchers of a per-service dashboard's queries."""
    return f'job="leadwerk-{service}", instance=~"$instance"'


def quantiles(metric: str, matchers: str, by: str = "") -> tuple[Target, ...]:
    """p50, p95 and p99 of a histogram (``by``: more labels to keep, e.g. ``connector``)."""
    keep = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} p" if by else "p"
    return tuple(Target(f"histogram_quantile({q}, sum by ({keep}) "
                        f"(rate({metric}_bucket{{{matchers}}}{RATE})))",
                        f"{legend}{round(q * 100)}")
                 for q in (0.5, 0.95, 0.99))


def http_panels(prefix: str, matchers: str) -> list[Panel]:
    requests = f"{prefix}_http_requests_total"
    every = f"sum(rate({requests}{{{matchers}}}{RATE}))"
    return [
        series("Requests per second by route",
               Target(f"sum by (route) (rate({requests}{{{matchers}}}{RATE}))", "{{route}}"),
               unit="reqps", stacked=True,
               description="Rate: every HTTP request, by route template."),
        series("Errors: share of requests answered 5xx",
               Target(f'sum(rate({requests}{{{matchers}, status=~"5..", status!="503"}}{RATE}))'
                      f" / {every}", "5xx except 503"),
               Target(f'sum(rate({requests}{{{matchers}, status="503"}}{RATE})) / {every}',
                      "503 (backpressure / not ready)"),
               unit="percentunit",
               description="Errors: server errors as a share of all requests."),
        series("Client errors by status",
               Target(f'sum by (status) (rate({requests}{{{matchers}, status=~"4.."}}{RATE}))',
                      "{{status}}"), unit="reqps", stacked=True,
               description="4xx: requests the service refused (bad input, auth, limits)."),
        series("Duration", *quantiles(f"{prefix}_http_request_duration_seconds", matchers),
               unit="s", description="Duration: request latency quantiles over all routes."),
    ]


def consumer_panels(matchers: str) -> list[Panel]:
    return [
        stat("Consumers running",
             Target(f"sum by (group) (leadwerk_consumer_running{{{matchers}}})", "{{group}}"),
             description="Instances whose consumer of the group runs (0: stopped)."),
        stat("Consumer lag",
             Target(f"sum by (group) (leadwerk_consumer_lag_records{{{matchers}}})",
                    "{{group}}"), unit="short", description="Records not yet committed."),
        stat("Dead letters in range",
             Target(f"sum(increase(leadwerk_consumer_records_dead_lettered_total"
                    f"{{{matchers}}}[$__range]))"), unit="short"),
        stat("Handler errors in range",
             Target(f"sum(increase(leadwerk_consumer_handler_errors_total"
                    f"{{{matchers}}}[$__range]))"), unit="short"),
        series("Records processed per second",
               Target(f"sum by (group, topic) (rate(leadwerk_consumer_records_processed_total"
                      f"{{{matchers}}}{RATE}))", "{{group}} ← {{topic}}"),
               unit="ops", stacked=True, description="Rate: records handled, per group and "
               "topic."),
        series("Handler errors by kind",
               Target(f"sum by (group, kind) (rate(leadwerk_consumer_handler_errors_total"
                      f"{{{matchers}}}{RATE}))", "{{group}}: {{kind}}"),
               unit="ops", description="Errors: invalid (dead-lettered), transient (retried), "
               "batch (fell back to one by one)."),
        series("Handler duration per batch (p95)",
               Target(f"histogram_quantile(0.95, sum by (group, le) "
                      f"(rate(leadwerk_consumer_handler_duration_seconds_bucket"
                      f"{{{matchers}}}{RATE})))", "{{group}}"),
               unit="s", description="Duration: one batch until its effects are durable."),
        series("Lag by group and topic",
               Target(f"sum by (group, topic) (leadwerk_consumer_lag_records{{{matchers}}})",
                      "{{group}} ← {{topic}}"), unit="short"),
        series("Dead letters by group and topic",
               Target(f"sum by (group, topic) (increase("
                      f"leadwerk_consumer_records_dead_lettered_total{{{matchers}}}{RATE}))",
                      "{{group}} ← {{topic}}"), unit="short", bars=True),
    ]


def process_panels(matchers: str) -> list[Panel]:
    return [
        series("CPU (cores)",
               Target(f"sum by (instance) (rate(process_cpu_seconds_total{{{matchers}}}{RATE}))",
                      "{{instance}}"), unit="short"),
        series("Resident memory",
               Target(f"sum by (instance) (process_resident_memory_bytes{{{matchers}}})",
                      "{{instance}}"), unit="bytes"),
    ]


def _bounce_rate(matchers: str, window: str) -> str:
    outcomes = "leadwerk_mailer_outcomes_total"
    return (f'sum(increase({outcomes}{{{matchers}, state="bounced"}}[{window}])) / '
            f'sum(increase({outcomes}{{{matchers}, state=~"sent|bounced"}}[{window}]))')


def _services() -> tuple[Service, ...]:
    ingest, scoring, workflow = selector("ingest"), selector("scoring"), selector("workflow")
    mailer, crm = selector("mailer"), selector("crm-bridge")
    return (
        Service("ingest", "Leadwerk ingest", "leadwerk_ingest", consumers=False, panels=(
            series("Events accepted by type",
                   Target(f"sum by (type) (rate(leadwerk_ingest_events_accepted_total"
                          f"{{{ingest}}}{RATE}))", "{{type}}"), unit="ops", stacked=True),
            series("Events rejected by reason",
                   Target(f"sum by (reason) (rate(leadwerk_ingest_events_rejected_total"
                          f"{{{ingest}}}{RATE}))", "{{reason}}"), unit="ops", stacked=True),
            series("Broker acknowledgement time",
                   *quantiles("leadwerk_ingest_produce_duration_seconds", ingest), unit="s",
                   description="From handing a request's events to the producer until "
                   "every ack."),
        )),
        Service("scoring", "Leadwerk scoring", "leadwerk_scoring", consumers=True, panels=(
            series("Lifecycle transitions by stage",
                   Target(f"sum by (to_stage) (rate(leadwerk_scoring_stage_transitions_total"
                          f"{{{scoring}}}{RATE}))", "→ {{to_stage}}"), unit="ops"),
            series("Engagement rule matches (top 10)",
                   Target(f"topk(10, sum by (rule) (rate(leadwerk_scoring_rule_matches_total"
                          f"{{{scoring}}}{RATE})))", "{{rule}}"), unit="ops"),
            series("Capped rule matches",
                   Target(f"sum by (rule) (rate(leadwerk_scoring_capped_matches_total"
                          f"{{{scoring}}}{RATE}))", "{{rule}}"), unit="ops"),
            series("Merges and device switches",
                   Target(f"sum by (reason) (rate(leadwerk_scoring_merges_total"
                          f"{{{scoring}}}{RATE}))", "merge: {{reason}}"),
                   Target(f"sum(rate(leadwerk_scoring_device_switches_total"
                          f"{{{scoring}}}{RATE}))", "device switch"), unit="ops"),
            series("Events kept out of timelines",
                   Target(f"sum by (reason) (rate(leadwerk_scoring_skipped_events_total"
                          f"{{{scoring}}}{RATE}))", "{{reason}}"), unit="ops"),
            series("Duplicates recognised",
                   Target(f"sum by (processor) (rate(leadwerk_scoring_duplicate_events_total"
                          f"{{{scoring}}}{RATE}))", "{{processor}}"), unit="ops"),
            series("Batch duration incl. outbox (p95)",
                   Target(f"histogram_quantile(0.95, sum by (processor, le) (rate("
                          f"leadwerk_scoring_batch_duration_seconds_bucket{{{scoring}}}"
                          f"{RATE})))", "{{processor}}"), unit="s"),
            series("Re-score progress and anonymous events purged",
                   Target(f"max(leadwerk_scoring_rescore_contacts_done{{{scoring}}})",
                          "contacts re-scored"),
                   Target(f"sum(increase(leadwerk_scoring_anonymous_events_purged_total"
                          f"{{{scoring}}}{RATE}))", "purged"), unit="short"),
        )),
        Service("workflow", "Leadwerk workflow", "leadwerk_workflow", consumers=True, panels=(
            series("Enrollments by journey",
                   Target(f"sum by (journey) (rate(leadwerk_workflow_enrollments_total"
                          f"{{{workflow}}}{RATE}))", "{{journey}}"), unit="ops"),
            series("Steps by action",
                   Target(f"sum by (action) (rate(leadwerk_workflow_steps_total"
                          f"{{{workflow}}}{RATE}))", "{{action}}"), unit="ops", stacked=True),
            series("Commands sent by kind",
                   Target(f"sum by (kind) (rate(leadwerk_workflow_commands_total"
                          f"{{{workflow}}}{RATE}))", "{{kind}}"), unit="ops"),
            series("Timers fired by outcome",
                   Target(f"sum by (outcome) (rate(leadwerk_workflow_timers_fired_total"
                          f"{{{workflow}}}{RATE}))", "{{outcome}}"), unit="ops"),
            series("Events consumed by type",
                   Target(f"sum by (type) (rate(leadwerk_workflow_events_consumed_total"
                          f"{{{workflow}}}{RATE}))", "{{type}}"), unit="ops"),
        )),
        Service("mailer", "Leadwerk mailer", "leadwerk_mailer", consumers=True, panels=(
            stat("Bounce rate (last hour)", Target(_bounce_rate(mailer, "1h")),
                 unit="percentunit", width=12),
            stat("Emails sent in range",
                 Target(f'sum(increase(leadwerk_mailer_outcomes_total{{{mailer}, '
                        f'state="sent"}}[$__range]))'), width=12),
            series("Delivery outcomes",
                   Target(f"sum by (state) (rate(leadwerk_mailer_outcomes_total"
                          f"{{{mailer}}}{RATE}))", "{{state}}"), unit="ops", stacked=True,
                   description="sent, deferred, bounced, failed, suppressed, held."),
            series("Bounce rate (1 hour window)", Target(_bounce_rate(mailer, "1h"), "bounced"),
                   unit="percentunit"),
            series("Email commands by class",
                   Target(f'sum by (class) (rate(leadwerk_mailer_commands_total{{{mailer}}}'
                          f"{RATE}))", "{{class}}"), unit="ops"),
            series("Duplicate commands not sent again",
                   Target(f"sum(rate(leadwerk_mailer_duplicate_commands_total{{{mailer}}}"
                          f"{RATE}))", "duplicates"), unit="ops"),
        )),
        Service("crm-bridge", "Leadwerk crm-bridge", "leadwerk_crm", consumers=True, panels=(
            stat("Circuits open",
                 Target(f"sum(max by (endpoint) (leadwerk_crm_circuit_open{{{crm}}}))"),
                 width=12, description="Endpoints whose circuit breaker is open."),
            stat("Dead deliveries in range",
                 Target(f'sum(increase(leadwerk_crm_delivery_attempts_total{{{crm}, '
                        f'outcome="dead"}}[$__range]))'), width=12,
                 description="Listed by GET /api/deliveries?state=dead, replayable."),
            series("Delivery attempts by outcome",
                   Target(f"sum by (outcome) (rate(leadwerk_crm_delivery_attempts_total"
                          f"{{{crm}}}{RATE}))", "{{outcome}}"), unit="reqps", stacked=True),
            series("Deliveries arrived by connector",
                   Target(f"sum by (connector) (rate(leadwerk_crm_deliveries_delivered_total"
                          f"{{{crm}}}{RATE}))", "{{connector}}"), unit="ops"),
            series("CRM request duration by connector",
                   *quantiles("leadwerk_crm_request_duration_seconds", crm, by="connector"),
                   unit="s"),
            series("Circuit breakers",
                   Target(f"max by (endpoint) (leadwerk_crm_circuit_open{{{crm}}})",
                          "{{endpoint}}"), unit="short"),
            series("Deliveries queued by kind",
                   Target(f"sum by (kind) (rate(leadwerk_crm_deliveries_queued_total"
                          f"{{{crm}}}{RATE}))", "{{kind}}"), unit="ops", stacked=True),
            series("Inbound CRM events",
                   Target(f"sum by (source, result) (rate(leadwerk_crm_inbound_events_total"
                          f"{{{crm}}}{RATE}))", "{{source}}: {{result}}"), unit="ops"),
        )),
    )


SERVICES = _services()


def overview_panels() -> list[Panel]:
    ingest = 'job="leadwerk-ingest"'
    requests = "leadwerk_ingest_http_requests_total"
    outcomes = "leadwerk_mailer_outcomes_total"
    every = f"sum(rate({requests}{{{ingest}}}{RATE}))"
    return [
        stat("Events in per second",
             Target(f"sum(rate(leadwerk_ingest_events_accepted_total{{{ingest}}}{RATE}))"),
             unit="ops", description="Events ingest accepted (the broker acknowledged them)."),
        stat("Consumer lag (records)", Target("sum(leadwerk_consumer_lag_records)"),
             description="Records not yet committed, all groups."),
        stat("Dead letters in range",
             Target("sum(increase(leadwerk_consumer_records_dead_lettered_total[$__range]))"),
             description="Records copied to dead-letter topics by any group."),
        stat("Bounce rate (last hour)",
             Target(_bounce_rate('job="leadwerk-mailer"', "1h")), unit="percentunit"),
        stat("Services up", Target('sum by (job) (up{job=~"leadwerk-.+"})', "{{job}}"),
             width=12, description="Scraped instances per service."),
        stat("CRM circuits open",
             Target("sum(max by (endpoint) (leadwerk_crm_circuit_open))"), width=12),
        series("Events in by type",
               Target(f"sum by (type) (rate(leadwerk_ingest_events_accepted_total"
                      f"{{{ingest}}}{RATE}))", "{{type}}"), unit="ops", stacked=True),
        series("Ingest errors and backpressure",
               Target(f'sum(rate({requests}{{{ingest}, status=~"5..", status!="503"}}{RATE}))'
                      f" / {every}", "5xx except 503"),
               Target(f'sum(rate({requests}{{{ingest}, status="503"}}{RATE})) / {every}',
                      "503 (broker not acknowledging)"), unit="percentunit"),
        series("Events per stage (records processed per group)",
               Target(f"sum by (group, topic) (rate(leadwerk_consumer_records_processed_total"
                      f"{RATE}))", "{{group}} ← {{topic}}"), unit="ops",
               description="Each consumer group is a stage: stitcher, scorer, workflow "
               "engine, mailer, crm-bridge."),
        series("Consumer lag per group",
               Target("sum by (group) (leadwerk_consumer_lag_records)", "{{group}}"),
               unit="short"),
        series("Dead letters per group and topic",
               Target(f"sum by (group, topic) (increase("
                      f"leadwerk_consumer_records_dead_lettered_total{RATE}))",
                      "{{group}} ← {{topic}}"), unit="short", bars=True),
        series("Emails sent and bounced",
               Target(f'sum by (state) (rate({outcomes}{{state=~"sent|bounced"}}{RATE}))',
                      "{{state}}"), unit="ops"),
        series("CRM deliveries and failures",
               Target(f"sum by (outcome) (rate(leadwerk_crm_delivery_attempts_total{RATE}))",
                      "{{outcome}}"),
               Target(f"sum(rate(leadwerk_crm_deliveries_delivered_total{RATE}))",
                      "records delivered"), unit="ops",
               description="Requests (one per batch) by outcome: delivered, retry, dead, "
               "circuit_open."),
        series("Lifecycle transitions",
               Target(f"sum by (to_stage) (rate(leadwerk_scoring_stage_transitions_total"
                      f"{RATE}))", "→ {{to_stage}}"), unit="ops"),
        stat("Lifecycle funnel: contacts entering each stage in range",
             Target("sum by (to_stage) (increase(leadwerk_scoring_stage_transitions_total"
                    "[$__range]))", "{{to_stage}}"), width=24, height=5),
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "bars" if panel.bars else "line", "lineWidth": 1, "fillOpacity": 10,
            "showPoints": "never", "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"}}
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                   "orientation": "auto", "textMode": "auto"}
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend or "__auto", "range": True}
                    for i, t in enumerate(panel.targets)],
    }


def _layout(panels: list[Panel]) -> list[dict[str, Any]]:
    """Left to right, a new line when the next panel does not fit."""
    placed, x, y, line_height = [], 0, 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        placed.append(_panel_json(panel, panel_id, x, y))
        x, line_height = x + panel.width, max(line_height, panel.height)
    return placed


def _variables(job: str | None) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [{
        "name": "datasource", "label": "Data source", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
        "options": [], "includeAll": False, "multi": False}]
    if job is not None:
        query = f'label_values(up{{job="{job}"}}, instance)'
        variables.append({
            "name": "instance", "label": "Instance", "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": "instances"}, "definition": query,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
            "hide": 0, "regex": "", "options": []})
    return variables


def dashboard(uid: str, title: str, description: str, panels: list[Panel],
              job: str | None) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["leadwerk"],
        "editable": True, "graphTooltip": 1, "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timepicker": {},
        "annotations": {"list": []}, "fiscalYearStartMonth": 0, "liveNow": False,
        "links": [{"title": "Leadwerk dashboards", "type": "dashboards", "tags": ["leadwerk"],
                   "asDropdown": True, "includeVars": False, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""}],
        "templating": {"list": _variables(job)},
        "panels": _layout(panels),
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON."""
    result = {"overview.json": dashboard(
        "leadwerk-overview", "Leadwerk overview",
        "The event path end to end: events in, each stage, lag, dead letters, email, CRM, "
        "lifecycle funnel. Alerts: docs/operations.md.", overview_panels(), None)}
    for service in SERVICES:
        panels = [*(http_panels(service.http_prefix, service.selector)
                    if service.http_prefix else []),
                  *(consumer_panels(service.selector) if service.consumers else []),
                  *service.panels, *process_panels(service.selector)]
        result[f"{service.name}.json"] = dashboard(
            f"leadwerk-{service.name}", service.title,
            f"RED metrics of {service.name} (requests, errors, duration; consumers: records, "
            "errors, handler duration, lag) and its own panels.", panels, service.job)
    return result


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed file differs from what this script writes")
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = HERE / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        sys.stderr.write(f"out of date (run deploy/grafana/generate.py): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
