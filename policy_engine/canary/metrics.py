"""Prometheus gauges of the rollouts, on the service's registry."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge

from policy_engine.canary.state import PHASES, RolloutState


class CanaryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # With several workers the value the latest live writer set wins: they all read one store.
        self.weight = Gauge(
            "pe_canary_weight",
            "Percent of eligible traffic sent to the canary, by canary policy.",
            ["policy"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.phase = Gauge(
            "pe_canary_phase",
            "1 for the rollout's current phase, 0 for the others.",
            ["policy", "phase"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )

    def set(self, state: RolloutState) -> None:
        self.weight.labels(state.policy).set(state.weight)
        for phase in PHASES:
            self.phase.labels(state.policy, phase).set(1 if phase == state.phase else 0)

    def update(self, states: Mapping[str, RolloutState]) -> None:
        for state in states.values():
            self.set(state)
