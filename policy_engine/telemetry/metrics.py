"""Prometheus view of the telemetry itself: what the decisions see, and how fresh it is.

Register `TelemetryCollector(hub, access_log, scraper)` on the service's registry. Values are
read at scrape time from the current snapshot (no extra bookkeeping on the request path).

A custom collector is not covered by prometheus_client's multi-process mode (`--workers > 1`,
where the parent serves what the workers wrote to files): there `MultiprocessTelemetry` copies
what the collector reports into the mode's own metrics on a timer, gauges per worker process
(a `pid` label; each worker has its own hub) and counters summed over the workers.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from policy_engine.telemetry.access_log import AccessLogService
from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.scrape import MetricsScraper

_GAUGES = (
    ("healthy", "1 if the backend is not ejected by consecutive failures."),
    ("stale", "1 if no fresh telemetry arrived within the staleness bound."),
    ("age_s", "Seconds since the last fresh telemetry (+Inf if never)."),
    ("latency_p50_ms", "Decayed median upstream latency."),
    ("latency_p99_ms", "Decayed p99 upstream latency."),
    ("ttft_p99_ms", "Decayed p99 time to first token."),
    ("error_rate", "Decayed fraction of 5xx answers and connect failures."),
    ("rps", "Decayed requests per second."),
    ("inflight", "Requests being served (scraped, else estimated)."),
    ("queue_depth", "Requests waiting (scraped)."),
    ("kv_cache_usage", "KV-cache usage 0..1 (scraped)."),
    ("tokens_per_s", "Decayed generated tokens per second."),
)


class TelemetryCollector(Collector):
    def __init__(
        self,
        hub: TelemetryHub,
        access_log: AccessLogService | None = None,
        scraper: MetricsScraper | None = None,
    ) -> None:
        self._hub = hub
        self._access_log = access_log
        self._scraper = scraper

    def collect(self) -> Iterator[Metric]:
        snapshot = self._hub.snapshot()
        for field, documentation in _GAUGES:
            family = GaugeMetricFamily(f"pe_telemetry_backend_{field}", documentation, labels=["backend"])
            for name, stats in snapshot.backends.items():
                family.add_metric([name], float(getattr(stats, field)))
            yield family
        yield GaugeMetricFamily(
            "pe_telemetry_snapshot_version", "Version of the snapshot decisions read.", value=snapshot.version
        )
        requests = CounterMetricFamily(
            "pe_telemetry_backend_requests", "Requests the backend answered (or refused).", labels=["backend"]
        )
        errors = CounterMetricFamily(
            "pe_telemetry_backend_errors", "Of those, 5xx answers and connect failures.", labels=["backend"]
        )
        failures = GaugeMetricFamily(
            "pe_telemetry_consecutive_failures", "Consecutive failed requests.", labels=["backend"]
        )
        for name in snapshot.backends:
            status = self._hub.status(name)
            if status is not None:
                requests.add_metric([name], status.requests_total)
                errors.add_metric([name], status.errors_total)
                failures.add_metric([name], status.consecutive_failures)
        yield requests
        yield errors
        yield failures
        if self._access_log is not None:
            entries = CounterMetricFamily(
                "pe_telemetry_access_log_entries", "Access-log entries by outcome.", labels=["outcome"]
            )
            counters = self._access_log.counters
            for outcome in ("observed", "ignored", "unknown_backend", "malformed"):
                entries.add_metric([outcome], getattr(counters, outcome))
            yield entries
            charges = CounterMetricFamily(
                "pe_access_log_charges",
                "Token charges from access-log entries: counters charged, entries of charge calls that "
                "failed, entries dropped while the counter store was behind.",
                labels=["outcome"],
            )
            charges.add_metric(["charged"], counters.charged)
            charges.add_metric(["failed"], counters.charge_errors)
            charges.add_metric(["dropped"], counters.charges_dropped)
            yield charges
        if self._scraper is not None:
            scrapes = CounterMetricFamily(
                "pe_telemetry_scrapes", "Metrics scrapes of backends by outcome.", labels=["outcome"]
            )
            scrapes.add_metric(["ok"], self._scraper.successes)
            scrapes.add_metric(["failed"], self._scraper.failures)
            yield scrapes


class MultiprocessTelemetry:
    """Mirrors a collector into multi-process metrics: call `refresh()` every few seconds.

    A backend that leaves the configuration keeps its last gauge values until its worker exits:
    the multi-process mode cannot remove a series.
    """

    def __init__(self, collector: Collector, registry: CollectorRegistry) -> None:
        self._collector = collector
        self._registry = registry
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._reported: dict[tuple[str, tuple[str, ...]], float] = {}

    def refresh(self) -> None:
        for family in self._collector.collect():
            for sample in family.samples:
                names = tuple(sample.labels)
                values = tuple(sample.labels[name] for name in names)
                if family.type == "gauge":
                    gauge = self._gauges.get(family.name)
                    if gauge is None:
                        gauge = self._gauges[family.name] = Gauge(
                            family.name,
                            family.documentation,
                            names,
                            registry=self._registry,
                            multiprocess_mode="liveall",
                        )
                    (gauge.labels(*values) if names else gauge).set(sample.value)
                elif family.type == "counter" and sample.name.endswith("_total"):
                    counter = self._counters.get(family.name)
                    if counter is None:
                        counter = self._counters[family.name] = Counter(
                            family.name, family.documentation, names, registry=self._registry
                        )
                    # The collector reports totals, which only grow within a process; the files
                    # hold increments. A total read lower than before adds nothing (never the
                    # whole total again), and a series exists from its first report, at 0.
                    key = (family.name, values)
                    previous = self._reported.get(key, 0.0)
                    child = counter.labels(*values) if names else counter
                    if sample.value > previous:
                        child.inc(sample.value - previous)
                        self._reported[key] = sample.value
