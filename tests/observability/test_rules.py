"""The alert rules (deploy/k8s/base/prometheusrule.yaml): valid for Prometheus, each documented,
and firing exactly when alerts.test.yaml says (``promtool test rules``)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from .promql import ROOT, metric_names, rule_exprs, rule_groups, write_rules

OPERATIONS = ROOT / "docs" / "operations.md"
UNIT_TESTS = Path(__file__).parent / "alerts.test.yaml"
REQUIRED = {"LeadwerkTargetDown", "LeadwerkServiceAbsent", "LeadwerkConsumerLagHigh",
            "LeadwerkConsumerLagGrowing", "LeadwerkDeadLetters", "LeadwerkIngestErrors",
            "LeadwerkIngestBackpressure", "LeadwerkBounceRateHigh", "LeadwerkCrmCircuitOpen"}


def promtool_run(promtool: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                            cwd=cwd, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_rules_pass_promtool_check_rules(promtool: str, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", rule_groups())
    output = promtool_run(promtool, "check", "rules", str(rules))
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in output


def test_the_alerts_fire_when_they_should_and_not_otherwise(promtool: str,
                                                            tmp_path: Path) -> None:
    """Annotations are left out: promtool would compare their rendered text too, and their
    templates are checked above; here it is about when an alert fires and its labels."""
    groups = copy.deepcopy(rule_groups())
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    write_rules(tmp_path / "rules.yaml", groups)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    output = promtool_run(promtool, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert "SUCCESS" in output
    tested = set(re.findall(r"alertname: (\w+)", UNIT_TESTS.read_text(encoding="utf-8")))
    assert tested == {rule["alert"] for group in rule_groups() for rule in group["rules"]}


def test_a_broken_rule_fails_the_unit_tests(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: with the lag threshold out of reach, promtool says so."""
    groups = copy.deepcopy(rule_groups())
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            rule["expr"] = rule["expr"].replace("> 900", "> 90000")
    write_rules(tmp_path / "rules.yaml", groups)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "LeadwerkConsumerLagHigh" in result.stdout + result.stderr


def test_the_absent_service_alert_names_every_service_of_the_manifests() -> None:
    """absent() needs each job spelled out: a new service must be added to the alert."""
    services = {doc["metadata"]["name"]
                for path in (ROOT / "deploy" / "k8s" / "base").glob("*.yaml")
                for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                if isinstance(doc, dict) and doc.get("kind") == "Service"}
    assert services >= {"leadwerk-ingest", "leadwerk-mailer"}
    (absent,) = [rule["expr"] for group in rule_groups() for rule in group["rules"]
                 if rule["alert"] == "LeadwerkServiceAbsent"]
    assert set(re.findall(r'absent\(up\{job="([^"]+)"\}\)', absent)) == services


def test_every_alert_says_how_bad_what_and_where_the_runbook_is() -> None:
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")}
    alerts = {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}
    assert set(alerts) >= REQUIRED
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), name
        assert anchor in headings, f"docs/operations.md has no section for {name}"


def test_the_rules_select_by_the_scrape_jobs_label() -> None:
    """Service metrics carry job="leadwerk-<service>" (the ServiceMonitor's job label)."""
    exprs = rule_exprs()
    assert any('job=~"leadwerk-.+"' in e for e in exprs)
    assert all(metric_names(e) for e in exprs)
