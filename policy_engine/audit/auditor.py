"""One object the Check handler hands each finished decision to: span and decision-log line.

Built in the composition root only when tracing or the decision log is on; the handler skips
it entirely otherwise, so the hot path pays nothing for audit that is off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.trace import SpanContext
from opentelemetry.util.types import AttributeValue

from policy_engine.audit.decision_log import DecisionLog, Timing
from policy_engine.audit.propagation import parent_span_context
from policy_engine.audit.tracing import DecisionTracer
from policy_engine.decide.attributes import LlmRequest, RequestAttributes, llm_request, parse_body
from policy_engine.decide.decision import Decision
from policy_engine.decide.tenants import TenantRegistry
from policy_engine.telemetry.snapshot import TelemetrySnapshot

log = logging.getLogger("policy_engine.audit")

_TRACE_KEYS = ("traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags")
# OpenTelemetry GenAI semantic conventions: gen_ai.operation.name values per request kind.
_OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings"}


def trace_headers(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The trace-context entries of gRPC invocation metadata, lower-case keys."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        name = key.lower()
        if name in _TRACE_KEYS and isinstance(value, str):
            found[name] = value
    return found


def span_attributes(
    attrs: RequestAttributes, llm: LlmRequest, decision: Decision, timing: Timing
) -> dict[str, AttributeValue]:
    """What an operator sees on the span: never a header value, a key or the body."""
    values: dict[str, AttributeValue] = {
        "pe.bundle": decision.bundle_version,
        "pe.decision": "allow" if decision.allowed else "deny",
        "pe.status": decision.status,
        "pe.reason": decision.reason,
        "pe.route": decision.route or "",
        "pe.tenant": decision.tenant,
        "pe.request_id": attrs.id,
        "pe.fired": [f.id for f in decision.fired],
        "pe.fired_effects": [f.effect for f in decision.fired],
        "pe.dry_run": [f"{f.id}:{f.effect}" for f in decision.dry_run],
        "pe.errors": len(decision.errors),
        "pe.eval_us": round(timing.eval_s * 1e6, 1),
        "pe.latency_us": round(timing.latency_s * 1e6, 1),
        "http.request.method": attrs.method,
        "url.path": attrs.path_only,
        "server.address": attrs.host,
    }
    if decision.canary:
        values["pe.canary"] = [f"{name}={variant}" for name, variant in decision.canary.items()]
    if decision.quota:
        # Parallel lists, one entry per counter checked (its key is not shown: it may be anything).
        values["pe.quota.counter"] = [f"{q.policy}/{q.limit_name}/{q.kind}" for q in decision.quota]
        values["pe.quota.used"] = [q.used for q in decision.quota]
        values["pe.quota.limit"] = [q.limit for q in decision.quota]
        values["pe.quota.remaining"] = [q.remaining for q in decision.quota]
        values["pe.quota.exceeded"] = [q.exceeded for q in decision.quota]
    if llm.model:
        values["gen_ai.request.model"] = llm.model
    if llm.kind in _OPERATIONS:
        values["gen_ai.operation.name"] = _OPERATIONS[llm.kind]
    if llm.max_tokens > 0:
        values["gen_ai.request.max_tokens"] = llm.max_tokens
    if llm.temperature:
        values["gen_ai.request.temperature"] = llm.temperature
    if llm.prompt or llm.prompt_tokens:
        values["gen_ai.usage.input_tokens"] = llm.prompt_tokens  # the estimate charged at request time
    if llm.kind != "other":
        values["pe.stream"] = llm.stream
    return values


def _hex_ids(context: SpanContext | None) -> tuple[str, str]:
    if context is None or not context.is_valid:
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class Auditor:
    def __init__(
        self,
        tracer: DecisionTracer | None,
        decision_log: DecisionLog | None,
        tenants: Callable[[], TenantRegistry],
    ) -> None:
        self.tracer = tracer
        self.decision_log = decision_log
        self._tenants = tenants
        self.failures = 0

    def record(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        attrs: RequestAttributes,
        decision: Decision,
        telemetry: TelemetrySnapshot,
        timing: Timing,
    ) -> None:
        """Never raises: a fault in auditing must not turn into a failed decision."""
        try:
            self._record(metadata, attrs, decision, telemetry, timing)
        except Exception:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.exception("auditing decision %s failed (%d failures so far)", attrs.id, self.failures)

    def _record(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        attrs: RequestAttributes,
        decision: Decision,
        telemetry: TelemetrySnapshot,
        timing: Timing,
    ) -> None:
        # Envoy's ext_authz client span is in the call's metadata; without it, the request's own.
        parent = parent_span_context(trace_headers(metadata)) or parent_span_context(attrs.headers)
        keep = self.decision_log is not None and self.decision_log.keeps(decision)
        if self.tracer is None and not keep:
            return
        if decision.llm is not None:  # what the pipeline read: the body is not parsed again
            body, llm = decision.request_body, decision.llm
        else:
            body = parse_body(attrs)
            llm = llm_request(attrs, body)
        ids = _hex_ids(parent)[0], ""
        if self.tracer is not None:
            span = self.tracer.record(
                parent, timing.start_ns, timing.end_ns, span_attributes(attrs, llm, decision, timing)
            )
            if span.trace_flags.sampled:
                ids = _hex_ids(span)
        if keep and self.decision_log is not None:
            registry = self._tenants()
            tenant = registry.resolve(attrs.headers, attrs.source.principal)
            line = self.decision_log.line(
                attrs,
                body,
                llm,
                decision,
                telemetry,
                timing,
                ids,
                registry.key_headers,
                (tenant.credential, tenant.key_id),
            )
            self.decision_log.write(line)

    def flush(self) -> None:
        if self.decision_log is not None:
            self.decision_log.flush()

    def close(self, timeout_s: float) -> None:
        """On drain: flush the log and export the spans still queued, for at most `timeout_s`."""
        if self.decision_log is not None:
            self.decision_log.close()
        if self.tracer is not None and not self.tracer.shutdown(timeout_s):
            log.warning(
                "decision spans still queued were dropped: the collector took none within %.1f s", timeout_s
            )
