"""The trace a decision belongs to, from the headers of the call that asked for it.

Envoy's tracer puts `traceparent` (its ext_authz client span) in the gRPC metadata of the Check
call; the CheckRequest's HTTP headers carry whatever the client or an upstream proxy sent
(W3C `traceparent`, or Zipkin/Istio B3: the single `b3` header or the `x-b3-*` set). Callers
try the metadata first, then the HTTP headers. Malformed values are ignored, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
_HEX = re.compile(r"^[0-9a-f]+$")


def _span_context(trace_id: int, span_id: int, sampled: bool) -> SpanContext | None:
    if trace_id == 0 or span_id == 0:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def _w3c(value: str) -> SpanContext | None:
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None or match.group(1) == "ff":
        return None
    return _span_context(int(match.group(2), 16), int(match.group(3), 16), int(match.group(4), 16) & 1 == 1)


def _b3_ids(trace_id: str, span_id: str) -> tuple[int, int] | None:
    trace_id, span_id = trace_id.strip().lower(), span_id.strip().lower()
    if len(trace_id) not in (16, 32) or len(span_id) != 16:
        return None
    if not (_HEX.match(trace_id) and _HEX.match(span_id)):
        return None
    return int(trace_id, 16), int(span_id, 16)  # a 64-bit B3 trace id is the low half of the 128-bit one


def _b3_single(value: str) -> SpanContext | None:
    parts = value.strip().split("-")
    if len(parts) < 2:
        return None  # "0", "1" or "d" alone: a sampling decision without ids
    ids = _b3_ids(parts[0], parts[1])
    if ids is None:
        return None
    sampled = len(parts) < 3 or parts[2] in ("1", "d")
    return _span_context(*ids, sampled)


def _b3_multi(headers: Mapping[str, str]) -> SpanContext | None:
    ids = _b3_ids(headers.get("x-b3-traceid", ""), headers.get("x-b3-spanid", ""))
    if ids is None:
        return None
    sampled = headers.get("x-b3-sampled", "1").strip().lower() in ("1", "true", "d") or (
        headers.get("x-b3-flags", "") == "1"
    )
    return _span_context(*ids, sampled)


def parent_span_context(headers: Mapping[str, str]) -> SpanContext | None:
    """The remote parent named by lower-case `headers`: W3C first, then B3 single, then B3 multi."""
    if "traceparent" in headers:
        found = _w3c(headers["traceparent"])
        if found is not None:
            return found
    if "b3" in headers:
        found = _b3_single(headers["b3"])
        if found is not None:
            return found
    if "x-b3-traceid" in headers:
        return _b3_multi(headers)
    return None


def parent_context(span_context: SpanContext | None) -> Context | None:
    """An OpenTelemetry context whose current span is the remote parent (None: a new trace)."""
    if span_context is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context))
