"""What auditing adds to one decision: the decision span, the decision-log line, both.

Run: .venv/bin/python bench/audit.py [--iterations N]

Measures `Auditor.record` (what Check calls after answering) for the scenarios of
bench/decision.py, next to `Pipeline.decide` itself measured in the same run. Spans go through
the real SDK (BatchSpanProcessor) to an exporter that discards them, so the export itself
(another thread, off the request path) is not counted; the log writes to a temporary file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from bench.decision import BACKENDS, SCENARIOS, VARIANTS, measure  # noqa: E402
from policy_engine.audit.auditor import Auditor  # noqa: E402
from policy_engine.audit.decision_log import DecisionLog, LogSink, Timing  # noqa: E402
from policy_engine.audit.tracing import DecisionTracer  # noqa: E402
from policy_engine.decide.attributes import RequestAttributes  # noqa: E402
from policy_engine.decide.pipeline import Pipeline  # noqa: E402
from policy_engine.policy.compiler import load_bundle  # noqa: E402
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot  # noqa: E402

PARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _row(
    pipeline: Pipeline,
    requests: list[RequestAttributes],
    snapshot: TelemetrySnapshot,
    auditors: dict[str, Auditor],
    iterations: int,
) -> dict[str, float]:
    """Median µs of one decision, and of each auditor's record of it."""
    decisions = [pipeline.decide(r, snapshot) for r in requests]
    timing = Timing(1_767_225_600_000_000_000, 0.001, 0.0005)
    row = {
        "decide": statistics.median(
            measure(lambda i: pipeline.decide(requests[i % VARIANTS], snapshot), iterations)
        )
    }
    for label, auditor in auditors.items():
        samples = measure(
            lambda i, a=auditor: a.record(
                PARENT, requests[i % VARIANTS], decisions[i % VARIANTS], snapshot, timing
            ),
            iterations,
        )
        row[label] = statistics.median(samples)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    bundle = load_bundle(ROOT / "policies")
    pipeline = Pipeline(bundle)
    snapshot = TelemetrySnapshot(
        {name: BackendStats(name, queue_depth=i % 4) for i, name in enumerate(BACKENDS)}
    )
    workdir = Path(tempfile.mkdtemp(prefix="pe-bench-audit-"))

    def tracer() -> DecisionTracer:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        return DecisionTracer(provider)

    def decision_log(name: str) -> DecisionLog:
        return DecisionLog(LogSink(str(workdir / name)))

    auditors = {
        "span": Auditor(tracer(), None, lambda: bundle.tenants),
        "log line": Auditor(None, decision_log("log.jsonl"), lambda: bundle.tenants),
        "span + log line": Auditor(tracer(), decision_log("both.jsonl"), lambda: bundle.tenants),
    }
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.machine()} cores={os.cpu_count()} python={platform.python_version()}\n")
    print("| scenario | decide µs | + span µs | + log line µs | + both µs |")
    print("|---|---:|---:|---:|---:|")
    overall: dict[str, list[float]] = {"decide": [], **{name: [] for name in auditors}}
    for name, requests in SCENARIOS.items():
        row = _row(pipeline, requests, snapshot, auditors, args.iterations)
        for label, value in row.items():
            overall[label].append(value)
        cells = " | ".join(f"{row[label]:.1f}" for label in ("decide", *auditors))
        print(f"| {name} | {cells} |")
    for auditor in auditors.values():
        auditor.close(timeout_s=30.0)
    decide = statistics.median(overall["decide"])
    print(f"\nmedian over scenarios: decide {decide:.1f} µs; audit off adds one `is None` test per call")
    for label in auditors:
        value = statistics.median(overall[label])
        print(f"  + {label}: {value:.1f} µs ({100 * value / decide:.0f}% of the decision)")


if __name__ == "__main__":
    main()
