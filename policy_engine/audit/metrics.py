"""Prometheus metrics of the decision service, on a registry owned by the composition root."""

from __future__ import annotations

import warnings

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from policy_engine.decide.decision import Decision

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "pe_decisions_total", "Decisions by result and reason.", ["result", "reason"], registry=registry
        )
        self.rules = Counter(
            "pe_rule_fired_total",
            "Rules that fired, by policy, rule and effect.",
            ["policy", "rule", "effect"],
            registry=registry,
        )
        self.rule_decisions = Counter(
            "pe_rule_decisions_total",
            "Decisions by each rule that fired in them: policy, rule and the decision's result.",
            ["policy", "rule", "result"],
            registry=registry,
        )
        self.latency = Histogram(
            "pe_decision_seconds", "Time to answer a Check call.", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.store_errors = Counter(
            "pe_quota_store_errors_total",
            "Counter store calls that failed.",
            ["operation"],
            registry=registry,
        )
        self.store_latency = Histogram(
            "pe_quota_store_seconds",
            "Counter store call latency: an admission, or a batch of token charges.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_charged = Counter(
            "pe_tokens_charged_total", "Tokens charged after responses, by kind.", ["kind"], registry=registry
        )
        self.reloads = Counter(
            "pe_policy_reloads_total", "Policy reloads by result.", ["result"], registry=registry
        )
        self.reload_ok = Gauge(
            "pe_policy_reload_ok",
            "1 if the last policy load succeeded, 0 if it failed (the previous bundle still serves).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.reload_time = Gauge(
            "pe_policy_reload_timestamp_seconds",
            "Unix time of the last policy load attempt.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        # Zero-valued series from the start: an error rate needs the series before the first error.
        for operation in ("admit", "charge"):
            self.store_errors.labels(operation)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.bundle = Gauge(
            "pe_bundle_info",
            "The active policy bundle (value 1, version label).",
            ["version"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._version = ""
        self._children: dict[tuple[object, ...], Counter] = {}

    def set_bundle(self, version: str) -> None:
        if self._version and self._version != version:
            # In multiprocess mode remove() is not supported (a warning, the series stays): 0 first.
            self.bundle.labels(self._version).set(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.bundle.remove(self._version)
        self.bundle.labels(version).set(1)
        self._version = version

    def observe(self, decision: Decision, seconds: float) -> None:
        self.latency.observe(seconds)
        result = "allow" if decision.allowed else "deny"
        self._child(self.decisions, (result, decision.reason or "ok")).inc()
        for fired in decision.fired:
            self._child(self.rules, (fired.policy, fired.rule, fired.effect)).inc()
            self._child(self.rule_decisions, (fired.policy, fired.rule, result)).inc()

    def reloaded(self, ok: bool, version: str, when: float) -> None:
        self.reloads.labels("ok" if ok else "error").inc()
        self.reload_ok.set(1 if ok else 0)
        self.reload_time.set(when)
        self.set_bundle(version)

    def _child(self, metric: Counter, labels: tuple[str, ...]) -> Counter:
        # labels() validates and locks on every call (~3 µs); the set of label values is small.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
