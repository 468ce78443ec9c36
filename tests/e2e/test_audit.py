"""Audit through a real Envoy with its OpenTelemetry tracer: the decision span joins Envoy's
trace, secrets never reach spans or the decision log, and /metrics has every audit series;
over both ext_authz transports (gRPC Check and the HTTP protocol).

The OTLP collector is a gRPC TraceService server in this test process (tests/e2e/otlp_receiver.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policy_engine.audit.tracing import SPAN_NAME
from policy_engine.envoy.bootstrap import POLICY_HTTP_CLUSTER, Upstream
from tests.e2e.conftest import EXAMPLES, PREMIUM, PRO, TRANSPORTS, Gateway, gateway
from tests.e2e.harness import ServiceProcess, wait_until
from tests.e2e.otlp_receiver import ReceivedSpan, TraceReceiver

CHAT = {
    "model": "llama-3-8b-instruct",
    "messages": [{"role": "user", "content": "Hello there"}],
    "max_tokens": 64,
}
# Envoy's span for its authorization call: the gRPC method, or the HTTP cluster's name.
AUTHZ_SPANS = {
    "grpc": "async envoy.service.auth.v3.Authorization.Check egress",
    "http": f"async {POLICY_HTTP_CLUSTER} egress",
}


@dataclass
class TracedGateway:
    receiver: TraceReceiver
    gateway: Gateway
    decision_log: Path
    transport: str

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def service(self) -> ServiceProcess:
        return self.gateway.service

    @property
    def authz_span(self) -> str:
        """The name of Envoy's span for its authorization call."""
        return AUTHZ_SPANS[self.transport]

    def records(self) -> list[dict[str, object]]:
        if not self.decision_log.exists():
            return []
        return [json.loads(line) for line in self.decision_log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=TRANSPORTS)
def traced(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TracedGateway]:
    """The example policies behind Envoy with its OpenTelemetry tracer, spans and the decision
    log on; once with each ext_authz transport."""
    receiver = TraceReceiver().start()
    decision_log = tmp_path_factory.mktemp("audit") / "decisions.jsonl"
    gw = gateway(
        EXAMPLES,
        ["llama-8b-a", "llama-8b-b", "embed-a"],
        transport=request.param,
        envoy_options={"otlp_endpoint": Upstream("127.0.0.1", receiver.port)},
        extra_args=["--decision-log", str(decision_log)],
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    yield TracedGateway(receiver, gw, decision_log, request.param)
    gw.stop()
    receiver.stop()


def _spans_of(gateway: TracedGateway, trace_id: str) -> list[ReceivedSpan]:
    return [s for s in gateway.receiver.spans() if s.trace_id == trace_id]


def test_decision_span_is_a_child_of_envoys_ext_authz_span(traced: TracedGateway) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {**PRO, "traceparent": f"00-{trace_id}-{client_span}-01"}
    response = httpx.post(f"{traced.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert response.status_code == 200, response.text

    def complete() -> bool:
        names = {s.name for s in _spans_of(traced, trace_id)}
        return {SPAN_NAME, traced.authz_span, "ingress"} <= names

    wait_until(complete, 30, "decision and Envoy spans at the collector")
    spans = {s.name: s for s in _spans_of(traced, trace_id)}
    ingress, authz, decision = spans["ingress"], spans[traced.authz_span], spans[SPAN_NAME]
    # Envoy continues the client's trace; its Check call is a child of its ingress span...
    assert ingress.parent_id == client_span and authz.parent_id == ingress.span_id
    # ...and the decision span is a child of that Check call, in the same trace.
    assert decision.trace_id == ingress.trace_id == trace_id
    assert decision.parent_id == authz.span_id
    assert decision.service == "policy-engine" and decision.span.kind == decision.span.SPAN_KIND_SERVER
    attributes = decision.attributes()
    assert attributes["pe.decision"] == "allow" and attributes["pe.status"] == 200
    assert "api-access/known-tenant" in attributes["pe.fired"]
    assert attributes["pe.route"] == response.headers["x-backend"]
    assert attributes["pe.tenant"] and attributes["pe.bundle"]
    assert attributes["gen_ai.request.model"] == "llama-3-8b-instruct"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["pe.eval_us"] > 0
    assert attributes["pe.quota.counter"], "the example quotas count every chat request"

    # The decision log names the same trace and span.
    def logged() -> list[dict[str, object]]:
        return [r for r in traced.records() if r["trace_id"] == trace_id]

    wait_until(lambda: logged(), 30, "the decision log line")
    assert logged()[0]["span_id"] == decision.span_id
    assert logged()[0]["request_id"] == attributes["pe.request_id"]


def test_envoy_started_traces_join_too(traced: TracedGateway) -> None:
    """Without a client traceparent, Envoy starts the trace; every decision span still hangs
    under an ext_authz span of Envoy's with the same trace id."""
    for _ in range(3):
        httpx.post(f"{traced.url}/v1/chat/completions", json=CHAT, timeout=10)  # 401: no key

    def parented() -> tuple[int, int]:
        spans = traced.receiver.spans()
        authz = {(s.trace_id, s.span_id) for s in spans if s.name == traced.authz_span}
        decisions = [s for s in spans if s.name == SPAN_NAME]
        denied = [s for s in decisions if s.attributes().get("pe.reason") == "missing_api_key"]
        return len(denied), sum((s.trace_id, s.parent_id) in authz for s in decisions) - len(decisions)

    wait_until(lambda: parented()[0] >= 3 and parented()[1] == 0, 30, "denied decision spans under Envoy's")


def test_no_secret_reaches_spans_or_the_decision_log(traced: TracedGateway) -> None:
    planted_key = "sk-planted-" + secrets.token_hex(12)
    cookie_secret = "session-" + secrets.token_hex(12)
    premium_key = PREMIUM["authorization"].removeprefix("Bearer ")
    cases = [
        {**PREMIUM, "x-api-key": planted_key, "cookie": f"sid={cookie_secret}"},  # allowed
        {"authorization": f"Bearer {planted_key}"},  # an unknown key: denied 401
        {"authorization": f"Basic {planted_key}", "proxy-authorization": f"Bearer {planted_key}"},
    ]
    trace_ids = []
    for headers in cases:
        trace_id = secrets.token_hex(16)
        trace_ids.append(trace_id)
        headers = {**headers, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        httpx.post(f"{traced.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)

    def all_seen() -> bool:
        spans = {s.trace_id for s in traced.receiver.spans() if s.name == SPAN_NAME}
        logged = {r["trace_id"] for r in traced.records()}
        return set(trace_ids) <= spans and set(trace_ids) <= logged

    wait_until(all_seen, 30, "spans and log lines of the planted requests")
    exported = traced.receiver.serialized()
    log_text = traced.decision_log.read_text()
    for secret in (planted_key, cookie_secret, premium_key):
        assert secret.encode() not in exported, f"{secret} in an exported span"
        assert secret not in log_text, f"{secret} in the decision log"
    records = {r["trace_id"]: r for r in traced.records()}
    first = records[trace_ids[0]]["input"]
    assert isinstance(first, dict)
    # The credential headers are there as digests (present, not readable).
    assert first["headers"]["authorization"].startswith("sha256:")
    assert first["headers"]["x-api-key"].startswith("sha256:")
    assert first["headers"]["cookie"].startswith("sha256:")
    assert records[trace_ids[0]]["decision"] == "allow" and records[trace_ids[1]]["decision"] == "deny"


def test_metrics_have_every_audit_series(traced: TracedGateway) -> None:
    for headers in (PRO, {}):
        httpx.post(f"{traced.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)

    def samples() -> dict[str, list[tuple[dict[str, str], float]]]:
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(traced.service.metrics()):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
        return found

    wait_until(
        lambda: any(lab.get("result") == "deny" for lab, _ in samples().get("pe_decisions_total", [])),
        30,
        "a denial counted",
    )
    found = samples()
    results = {labels["result"] for labels, _ in found["pe_decisions_total"]}
    assert results == {"allow", "deny"}
    by_rule = {(lab["policy"], lab["rule"], lab["result"]) for lab, _ in found["pe_rule_decisions_total"]}
    assert ("api-access", "known-tenant", "allow") in by_rule
    assert ("api-access", "default", "deny") in by_rule
    assert any(lab.get("effect") for lab, _ in found["pe_rule_fired_total"])
    assert sum(v for _, v in found["pe_decision_seconds_count"]) >= 2
    assert any(lab.get("le") == "+Inf" for lab, _ in found["pe_decision_seconds_bucket"])
    assert {lab["operation"] for lab, _ in found["pe_quota_store_seconds_count"]} >= {"admit"}
    assert {lab["operation"] for lab, _ in found["pe_quota_store_errors_total"]} == {"admit", "charge"}
    assert found["pe_policy_reload_ok"][0][1] == 1.0
    assert found["pe_bundle_info"][0][0]["version"]
    assert {lab["backend"] for lab, _ in found["pe_telemetry_backend_age_s"]} == set(traced.gateway.backends)
