"""Decision spans with the real OpenTelemetry SDK (in-memory exporter) and trace-context extraction."""

from __future__ import annotations

import dataclasses
import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from policy_engine.audit.auditor import Auditor, span_attributes, trace_headers
from policy_engine.audit.decision_log import Timing
from policy_engine.audit.propagation import parent_span_context
from policy_engine.audit.tracing import (
    SPAN_NAME,
    DecisionTracer,
    TracingConfigError,
    check_environment,
    tracer_provider,
)
from policy_engine.decide.attributes import RequestAttributes, llm_request, parse_body
from policy_engine.decide.pipeline import Pipeline
from policy_engine.telemetry.snapshot import EMPTY_SNAPSHOT

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
KEY = "sk-acme-premium-key-0001"


def test_the_otlp_exporter_and_the_collector_stubs_import() -> None:
    """xds-protos ships an old opentelemetry/proto that breaks the exporter; setup must undo it."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    assert OTLPSpanExporter is not None and trace_service_pb2_grpc.TraceServiceStub is not None


def test_w3c_traceparent() -> None:
    context = parent_span_context({"traceparent": f"00-{TRACE}-{SPAN}-01"})
    assert context is not None and context.is_remote and context.trace_flags.sampled
    assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACE, SPAN)
    unsampled = parent_span_context({"traceparent": f"00-{TRACE}-{SPAN}-00"})
    assert unsampled is not None and not unsampled.trace_flags.sampled


def test_b3_single_and_multi() -> None:
    single = parent_span_context({"b3": f"{TRACE}-{SPAN}-1"})
    assert single is not None and f"{single.trace_id:032x}" == TRACE and single.trace_flags.sampled
    short = parent_span_context({"b3": f"{TRACE[16:]}-{SPAN}"})  # 64-bit trace id
    assert short is not None and f"{short.trace_id:032x}" == "0" * 16 + TRACE[16:]
    multi = parent_span_context({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"})
    assert multi is not None and f"{multi.span_id:016x}" == SPAN and not multi.trace_flags.sampled


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "garbage"},
        {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # all-zero trace id is invalid
        {"traceparent": f"ff-{TRACE}-{SPAN}-01"},  # version ff is forbidden
        {"b3": "1"},  # a sampling decision without ids
        {"b3": "zz-yy"},
        {"x-b3-traceid": TRACE},
    ],
)
def test_malformed_context_starts_a_new_trace(headers: dict[str, str]) -> None:
    assert parent_span_context(headers) is None


def test_w3c_wins_over_b3() -> None:
    context = parent_span_context({"traceparent": f"00-{TRACE}-{SPAN}-01", "b3": f"{'1' * 32}-{'2' * 16}"})
    assert context is not None and f"{context.trace_id:032x}" == TRACE


def test_trace_headers_from_grpc_metadata() -> None:
    metadata = (("traceparent", "00-x"), ("authorization", "Bearer k"), ("bin-bin", b"\x00"))
    assert trace_headers(metadata) == {"traceparent": "00-x"}
    assert trace_headers(None) == {}


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, ["none"]),
        ({"OTEL_TRACES_EXPORTER": "none"}, ["none"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["otlp"]),
    ],
)
def test_exporter_choice(environ: dict[str, str], exporters: list[str]) -> None:
    assert check_environment(environ) == exporters


def test_tracing_is_off_by_default_and_when_disabled() -> None:
    assert tracer_provider({}) is None
    assert tracer_provider({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracer_provider({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None


def test_console_exporter_builds_a_provider_named_after_the_service() -> None:
    provider = tracer_provider({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "pdp-eu"})
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "pdp-eu"
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    ],
)
def test_unsupported_settings_are_clear_errors(environ: dict[str, str]) -> None:
    with pytest.raises(TracingConfigError, match=r"zipkin|http/json"):
        check_environment(environ)


def _memory_tracer() -> tuple[DecisionTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return DecisionTracer(provider), exporter


def _request(headers: dict[str, str]) -> RequestAttributes:
    body = {"model": "llama-3-8b-instruct", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    return RequestAttributes(
        method="POST",
        path="/v1/chat/completions?api_key=" + KEY,
        host="ai.example.com",
        id="req-1",
        headers={"authorization": f"Bearer {KEY}", "cookie": f"s={KEY}", **headers},
        body=json.dumps(body).encode(),
    )


def test_decision_span_child_of_the_remote_parent_with_decision_attributes(
    example_pipeline: Pipeline,
) -> None:
    tracer, exporter = _memory_tracer()
    attrs = _request({})
    decision = example_pipeline.decide(attrs)
    auditor = Auditor(tracer, None, lambda: example_pipeline.bundle.tenants)
    timing = Timing(1_700_000_000_000_000_000, 0.002, 0.0005)
    auditor.record((("traceparent", f"00-{TRACE}-{SPAN}-01"),), attrs, decision, EMPTY_SNAPSHOT, timing)
    (span,) = exporter.get_finished_spans()
    assert span.name == SPAN_NAME and span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == SPAN
    assert (span.start_time, span.end_time) == (timing.start_ns, timing.start_ns + 2_000_000)
    attributes = dict(span.attributes or {})
    assert attributes["pe.decision"] == ("allow" if decision.allowed else "deny")
    assert attributes["pe.bundle"] == example_pipeline.bundle.version
    assert list(attributes["pe.fired"]) == decision.fired_ids()  # type: ignore[arg-type]
    assert attributes["gen_ai.request.model"] == "llama-3-8b-instruct"
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert attributes["url.path"] == "/v1/chat/completions"
    assert attributes["pe.eval_us"] == 500.0
    assert KEY not in json.dumps({k: str(v) for k, v in attributes.items()})


def test_request_headers_are_the_parent_when_the_metadata_has_none(example_pipeline: Pipeline) -> None:
    tracer, exporter = _memory_tracer()
    attrs = _request({"b3": f"{TRACE}-{SPAN}-1"})
    auditor = Auditor(tracer, None, lambda: example_pipeline.bundle.tenants)
    auditor.record((), attrs, example_pipeline.decide(attrs), EMPTY_SNAPSHOT, Timing(1, 0.001, 0.001))
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and f"{span.parent.span_id:016x}" == SPAN


def test_span_attributes_of_a_request_that_is_not_json(example_pipeline: Pipeline) -> None:
    attrs = RequestAttributes(method="GET", path="/healthz", body=b"\xff\xfe not json")
    decision = example_pipeline.decide(attrs)
    attributes = span_attributes(
        attrs, llm_request(attrs, parse_body(attrs)), decision, Timing(1, 0.001, 0.001)
    )
    assert attributes["pe.decision"] == "deny" and "gen_ai.request.model" not in attributes


def test_the_audit_reads_the_request_as_the_pipeline_did(
    example_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body is parsed once per request: the decision hands the pipeline's reading on."""
    from policy_engine.audit import auditor as auditor_module

    tracer, exporter = _memory_tracer()
    attrs = _request({})
    decision = example_pipeline.decide(attrs)
    assert decision.llm is not None and decision.llm.model == "llama-3-8b-instruct"
    assert decision.request_body == json.loads(attrs.body)
    # Not part of the decision's value.
    assert "llm" not in decision.to_dict() and "request_body" not in decision.to_dict()
    assert decision == dataclasses.replace(decision, llm=None, request_body=None)

    def parse_again(_: RequestAttributes) -> object:
        raise AssertionError("the body was parsed again")

    monkeypatch.setattr(auditor_module, "parse_body", parse_again)
    auditor = Auditor(tracer, None, lambda: example_pipeline.bundle.tenants)
    auditor.record((), attrs, decision, EMPTY_SNAPSHOT, Timing(1, 0.001, 0.001))
    assert auditor.failures == 0
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["gen_ai.request.model"] == "llama-3-8b-instruct"
