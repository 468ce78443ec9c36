"""The Grafana dashboard shipped with the chart queries only series the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.attributes import RequestAttributes
from policy_engine.decide.pipeline import Pipeline
from policy_engine.telemetry.hub import BackendSpec, TelemetryHub
from policy_engine.telemetry.metrics import TelemetryCollector
from tests.conftest import ROOT

DASHBOARD = ROOT / "charts" / "policy-engine" / "dashboards" / "policy-engine.json"
_METRIC = re.compile(r"\b(pe_[a-z0-9_]+)")


def _exported(example_pipeline: Pipeline) -> set[str]:
    """Sample names of the service's registry after a decision, a store call, a charge and a reload."""
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry)
    metrics.reloaded(True, example_pipeline.bundle.version, 1.0)
    metrics.observe(example_pipeline.decide(RequestAttributes(path="/v1/chat/completions")), 0.001)
    metrics.store_latency.labels("admit").observe(0.001)
    metrics.tokens_charged.labels("total_tokens").inc(10)
    registry.register(TelemetryCollector(TelemetryHub([BackendSpec("a")])))
    text = generate_latest(registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _queries(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_metric_is_exported(example_pipeline: Pipeline) -> None:
    exported = _exported(example_pipeline)
    queries = _queries(DASHBOARD)
    used = {name for query in queries for name in _METRIC.findall(query)}
    assert len(used) >= 10
    assert sorted(used - exported) == []


def test_dashboard_covers_every_audit_series() -> None:
    used = {name for query in _queries(DASHBOARD) for name in _METRIC.findall(query)}
    for wanted in (
        "pe_decisions_total",
        "pe_rule_decisions_total",
        "pe_decision_seconds_bucket",
        "pe_quota_store_seconds_bucket",
        "pe_quota_store_errors_total",
        "pe_policy_reload_ok",
        "pe_bundle_info",
        "pe_telemetry_backend_age_s",
    ):
        assert wanted in used, wanted
