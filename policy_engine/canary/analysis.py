"""The rollout analysis: the policy's CEL expression over the canary's and the stable's telemetry.

`canary` and `stable` are the Backend values decisions see (live latency and TTFT percentiles,
health, load), except `error_rate`, which is computed over the current step's own requests:
an error burst from a previous step (or from before a rollback) must not fail the next one, and
a failure in this step must not be diluted by older traffic.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from policy_engine.canary.machine import Analyse, Verdict
from policy_engine.canary.state import Counts
from policy_engine.cel.engine import CelEvalError, Environment
from policy_engine.decide.activation import MessageBuilder
from policy_engine.policy import bundle as b
from policy_engine.telemetry.snapshot import BackendStats


def _rate(errors: int, requests: int) -> float:
    return errors / requests if requests > 0 else 0.0


def _describe(role: str, stats: BackendStats) -> str:
    return (
        f"{role} {stats.name}: error_rate={stats.error_rate:.4f} latency_p99_ms={stats.latency_p99_ms:.1f} "
        f"ttft_p99_ms={stats.ttft_p99_ms:.1f}"
    )


def analyser(
    policy: b.CanaryPolicy,
    env: Environment,
    stable: BackendStats | None,
    canary: BackendStats | None,
    now: datetime,
    messages: MessageBuilder | None = None,
) -> Analyse:
    """The Analyse function the machine calls with the step's counters."""
    builder = messages or MessageBuilder()
    expr = policy.analysis

    def analyse(window: Counts) -> Verdict:
        if expr is None:
            return Verdict(None, "the policy has no analysis")
        if stable is None:
            return Verdict(None, f"no telemetry for the stable backend {policy.stable!r}", conclusive=False)
        stable_stats = dataclasses.replace(
            stable or BackendStats(policy.stable, healthy=False, stale=True),
            error_rate=_rate(window.stable_errors, window.stable_requests),
        )
        canary_stats = dataclasses.replace(
            canary or BackendStats(policy.canary, healthy=False, stale=True),
            error_rate=_rate(window.canary_errors, window.canary_requests),
        )
        values = {
            "canary": builder.backend(canary_stats),
            "stable": builder.backend(stable_stats),
            "now": now,
        }
        described = (
            f"{_describe('canary', canary_stats)} ({window.canary_requests} requests); "
            f"{_describe('stable', stable_stats)} ({window.stable_requests} requests)"
        )
        try:
            healthy = expr.program.test(env.activation(values))
        except CelEvalError as error:
            return Verdict(None, f"{described}; error: {error}")
        return Verdict(healthy, f"{described}; analysis {'passed' if healthy else 'failed'}")

    return analyse
