"""The PromQL of the alert rules and the dashboards, and the metric names it uses."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from leadwerk_platform.settings import repository_root

ROOT = repository_root()
RULES = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
GRAFANA = ROOT / "deploy" / "grafana"
#: Series Prometheus makes itself (not in any /metrics).
SYNTHETIC = {"up"}
#: What Grafana puts into a query before Prometheus sees it (a plausible value of each).
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "30s", "$__range": "6h",
                     "$instance": ".*"}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "bool", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects: identifiers that are no function, keyword, label
    (in matchers or groupings) or duration."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def rule_groups() -> list[dict[str, Any]]:
    """The ``spec.groups`` of the PrometheusRule: a Prometheus rule file's ``groups``."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert document["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = document["spec"]["groups"]
    return groups


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def generator() -> ModuleType:
    """deploy/grafana/generate.py, imported from its path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("leadwerk_grafana_generate",
                                                  GRAFANA / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(GRAFANA.glob("*.json"))}


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the check does not know: {expr}"
    return expr


def write_rules(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    return path
