"""OpenTelemetry spans of decisions: one SERVER span per Check, a child of the caller's span.

The tracer provider is built once, in the composition root, from the standard variables:
`OTEL_TRACES_EXPORTER` (`otlp`, `console` or `none`; default `none`), `OTEL_SERVICE_NAME`
(default `policy-engine`), `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER` / `_ARG` and `OTEL_BSP_*` (read by the SDK
itself), `OTEL_SDK_DISABLED`. Spans are exported in batches from the SDK's own thread; the
provider is shut down (flushed) when the service drains. No global provider is set: the
decision tracer holds its own.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.util.types import AttributeValue

from policy_engine.audit.propagation import parent_context

SPAN_NAME = "policy-engine decide"
DEFAULT_SERVICE_NAME = "policy-engine"
EXPORTERS = ("otlp", "console", "none")
_OTLP_PROTOCOLS = ("", "grpc")


class TracingConfigError(ValueError):
    """An OTEL_* variable this service cannot honour."""


def check_environment(environ: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables name; TracingConfigError for what is not supported."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: unknown exporter "
            f"{', '.join(unknown)} (use one of {', '.join(EXPORTERS)})"
        )
    if "otlp" in names:
        protocol = environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        if protocol.strip().lower() not in _OTLP_PROTOCOLS:
            raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported: only grpc is")
    return names


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = check_environment(environ)
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*
    if "console" in names:
        exporters.append(ConsoleSpanExporter(service_name=_service_name(environ)))
    return exporters


def _service_name(environ: Mapping[str, str]) -> str:
    return environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME


def tracer_provider(environ: Mapping[str, str]) -> TracerProvider | None:
    """The provider the OTEL_* variables ask for, or None when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = _exporters(environ)
    if not exporters:
        return None
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES; the sampler comes from OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: _service_name(environ)}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class DecisionTracer:
    """Records finished decisions as spans (start and end given: the decision is already made)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("policy_engine.audit")

    def record(
        self,
        parent: SpanContext | None,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, AttributeValue],
    ) -> SpanContext:
        span = self._tracer.start_span(
            SPAN_NAME,
            context=parent_context(parent),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=start_ns,
        )
        span.end(end_time=end_ns)
        return span.get_span_context()

    def shutdown(self, timeout_s: float) -> bool:
        """Export what is queued, then stop the export thread; whether it finished within
        `timeout_s`. An unreachable collector keeps the exporter retrying for its own timeout:
        the service must not outlive its grace period (and be killed) waiting for it."""
        done = threading.Thread(target=self._provider.shutdown, name="span-shutdown", daemon=True)
        done.start()
        done.join(timeout_s)
        return not done.is_alive()
