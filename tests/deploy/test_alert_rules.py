"""The Prometheus alerting rules (``deploy/prometheus-alerts.yml``) and the Grafana dashboard
(``deploy/grafana/keybrake.json``) name only metrics a real proxy serves on ``/metrics``, and
are well formed (``promtool`` is not available here: the rules' structure is checked as
Prometheus's rule-file format defines it, and each expression for balanced brackets)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import ROOT, KeybrakeProcess

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "keybrake.json"
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_OWN = {"up"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}
NAME = re.compile(r"(?<![\w.$])((?:keybrake|process)_[a-z0-9_]+|up)\b")
RULE_KEYS = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}


def served_series(kb: KeybrakeProcess) -> set[str]:
    text = httpx.get(f"{kb.admin_url}/metrics", timeout=10).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    # Label values and matchers ({code="cap_exhausted"}) are not metric names.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    return set(NAME.findall(bare))


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and expr.count('"') % 2 == 0


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    assert set(data) == {"groups"}
    out = []
    names = set()
    for group in data["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["name"] not in names
        names.add(group["name"])
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and {"alert", "expr"} <= set(rule), rule
            out.append(rule)
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["targets"] for p in dash["panels"])
    return exprs


def test_the_rules_and_the_dashboard_are_well_formed_and_wired_in() -> None:
    found = rules()
    alerts = [r["alert"] for r in found]
    assert len(alerts) == len(set(alerts))
    for rule in found:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert balanced(rule["expr"]), rule["expr"]
        assert metric_names(rule["expr"]), rule["expr"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"])
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        summary = rule["annotations"]["summary"]
        assert summary.count("{{") == summary.count("}}")
    for expr in dashboard_exprs():
        assert balanced(expr) and metric_names(expr), expr
    # The conditions the proxy's own alerts report each have a rule.
    exprs = " ".join(r["expr"] for r in found)
    for needle in (
        'code="cap_exhausted"',
        "keybrake_estimate_overruns_total",
        "keybrake_store_up",
        "keybrake_audit_queue_depth",
        'kind="threshold"',
        "key_revoked|issuer_revoked",
        "keybrake_alert_deliveries_total",
    ):
        assert needle in exprs, needle
    # prometheus.yml loads the rules, and compose mounts the file where it looks.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    for path in prometheus["rule_files"]:
        assert f"./{RULES.name}:{path}:ro" in mounts


def test_every_metric_the_rules_and_the_dashboard_name_is_served(
    keybrake_stripe: KeybrakeProcess,
) -> None:
    served = served_series(keybrake_stripe) | PROMETHEUS_OWN
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule['alert']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    missing = {name: sorted(where) for name, where in used.items() if name not in served}
    assert not missing, f"named but not served by /metrics: {missing}"
    # The check can fail: a misspelt name is caught.
    assert "keybrake_refusal_total" not in served


def test_the_metric_name_check_sees_through_label_matchers() -> None:
    expr = 'sum by (vendor) (increase(keybrake_refusals_total{code="keybrake_x_total"}[5m]))'
    assert metric_names(expr) == {"keybrake_refusals_total"}
    assert not balanced("sum(rate(x[5m])")
    assert Path(RULES).is_file() and Path(DASHBOARD).is_file()
