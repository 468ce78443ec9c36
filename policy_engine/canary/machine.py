"""The rollout state machine: a pure function from (state, spec, traffic, verdict, now) to a new state.

Every `interval` the step is judged on the traffic it has seen so far:

* fewer than `min_requests` requests to the canary: the step goes on and its traffic keeps
  accumulating; after `inconclusive_after` such intervals the rollout becomes explicitly
  `inconclusive` and `on_inconclusive` says what happens (`hold` keeps the weight and goes on
  judging every interval, `rollback` sends everything to stable, `promote` to the canary);
* enough requests: the analysis decides. Healthy → the next step (after the last, `promoted`);
  unhealthy, or an analysis that could not be evaluated → `rolled_back` (weight 0).

Manual commands (promote, abort, restart) apply at once. Nothing here reads a clock, a store or
the network: the controller supplies all of it, so every path is unit-testable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from policy_engine.canary.state import TERMINAL, Command, Counts, Phase, RolloutState, Transition
from policy_engine.policy.schema import Rollout


@dataclass(frozen=True)
class RolloutSpec:
    """The rollout section of a CanaryPolicy, as the machine needs it."""

    steps: tuple[int, ...]
    interval: float
    min_requests: int
    inconclusive_after: int
    on_inconclusive: Literal["hold", "rollback", "promote"]

    @classmethod
    def of(cls, rollout: Rollout) -> RolloutSpec:
        return cls(
            tuple(rollout.steps),
            rollout.interval,
            rollout.min_requests,
            rollout.inconclusive_after,
            rollout.on_inconclusive,
        )


@dataclass(frozen=True)
class Reading:
    """Cumulative counters of one telemetry source; `source` changes when they restart from zero."""

    source: str
    counts: Counts


UNAVAILABLE = "unavailable"  # the source of a reading taken while telemetry could not be read


@dataclass(frozen=True)
class Verdict:
    healthy: bool | None  # None: the analysis could not be evaluated
    detail: str
    # False: nothing to compare with yet (e.g. no telemetry for the stable backend); the interval
    # counts as one without enough traffic, which ends in an explicit `inconclusive`.
    conclusive: bool = True


# Judges the step's traffic (the counters of the step window; live statistics are the caller's).
Analyse = Callable[[Counts], Verdict]


@dataclass(frozen=True)
class Outcome:
    state: RolloutState
    events: tuple[Transition, ...] = ()


def start(policy: str, revision: str, spec: RolloutSpec, reading: Reading, now: float) -> Outcome:
    """A new rollout at the first step."""
    state = RolloutState(
        policy=policy,
        revision=revision,
        phase="progressing",
        step=0,
        weight=spec.steps[0],
        step_started_at=now,
        interval_started_at=now,
        source=reading.source,
        seen=reading.counts,
        last_analysis="started",
        updated_at=now,
    )
    event = Transition(now, policy, "progressing", "progressing", 0, spec.steps[0], 0, "rollout started")
    state = state.with_transition(event)
    return Outcome(state, (event,))


def _delta(state: RolloutState, reading: Reading) -> Counts:
    """Traffic since the last tick; counters that went down (a restarted source) count from zero."""
    if state.source == UNAVAILABLE or reading.source == UNAVAILABLE:
        # Nothing was known before (or is now): the next real reading is only a baseline, or all
        # the traffic a source ever saw would land in this step.
        return Counts()
    if reading.source != state.source:
        return reading.counts
    now, seen = reading.counts, state.seen
    pairs = (
        (now.canary_requests, seen.canary_requests),
        (now.canary_errors, seen.canary_errors),
        (now.stable_requests, seen.stable_requests),
        (now.stable_errors, seen.stable_errors),
    )
    return Counts(*(current - before if current >= before else current for current, before in pairs))


def _move(
    state: RolloutState,
    now: float,
    phase: Phase,
    weight: int,
    reason: str,
    *,
    step: int | None = None,
    analysis: str = "",
    new_step: bool = False,
) -> Outcome:
    transition = Transition(
        at=now,
        policy=state.policy,
        from_phase=state.phase,
        to_phase=phase,
        from_weight=state.weight,
        to_weight=weight,
        step=state.step if step is None else step,
        reason=reason,
        canary_requests=state.window.canary_requests,
        analysis=analysis,
    )
    changes: dict[str, object] = {
        "phase": phase,
        "weight": weight,
        "step": transition.step,
        "last_analysis": analysis or reason,
        "updated_at": now,
        "interval_started_at": now,
        "short_intervals": 0,
    }
    if new_step:
        changes.update(step_started_at=now, window=Counts())
    return Outcome(state.with_transition(transition, **changes), (transition,))


def _command(state: RolloutState, spec: RolloutSpec, command: Command, now: float) -> Outcome:
    if command == "promote":
        if state.phase == "promoted":
            return Outcome(state)
        return _move(state, now, "promoted", 100, "promoted by command")
    if command == "abort":
        if state.phase == "aborted":
            return Outcome(state)
        return _move(state, now, "aborted", 0, "aborted by command")
    return _move(state, now, "progressing", spec.steps[0], "restarted by command", step=0, new_step=True)


def advance(
    state: RolloutState,
    spec: RolloutSpec,
    reading: Reading,
    now: float,
    analyse: Analyse,
    command: Command | None = None,
) -> Outcome:
    """The state after one tick, and the transitions that happened in it (at most one)."""
    delta = _delta(state, reading)
    if reading.source == UNAVAILABLE and state.source != UNAVAILABLE:
        synced = state  # keep the baseline: the traffic of the outage counts once telemetry is back
    else:
        synced = replace(state, source=reading.source, seen=reading.counts, window=state.window + delta)
    if command is not None:
        return _command(synced, spec, command, now)
    if synced.phase in TERMINAL or now - synced.interval_started_at < spec.interval:
        return Outcome(synced)
    window = synced.window
    if window.canary_requests < spec.min_requests:
        return _short_interval(synced, spec, now)
    verdict = analyse(window)
    detail = verdict.detail
    if not verdict.conclusive:
        return _short_interval(synced, spec, now, detail)
    if verdict.healthy is None:  # fail safe: stable is the side known to work
        return _move(synced, now, "rolled_back", 0, "analysis could not be evaluated", analysis=detail)
    if not verdict.healthy:
        return _move(synced, now, "rolled_back", 0, "analysis failed", analysis=detail)
    if synced.step + 1 >= len(spec.steps) or synced.weight >= 100:
        return _move(synced, now, "promoted", 100, "analysis passed at the last step", analysis=detail)
    following = synced.step + 1
    return _move(
        synced,
        now,
        "progressing",
        spec.steps[following],
        "analysis passed",
        step=following,
        analysis=detail,
        new_step=True,
    )


def _short_interval(state: RolloutState, spec: RolloutSpec, now: float, missing: str = "") -> Outcome:
    """An interval ended without enough traffic (or data) to judge: wait, or give up explicitly."""
    short = state.short_intervals + 1
    waiting = (
        f"{missing or f'{state.window.canary_requests}/{spec.min_requests} canary requests'}"
        f" after {short} interval(s)"
    )
    if state.phase == "inconclusive" or short < spec.inconclusive_after:
        waited = replace(
            state, short_intervals=short, interval_started_at=now, last_analysis=waiting, updated_at=now
        )
        return Outcome(waited)
    reason = f"inconclusive: {waiting}, on_inconclusive={spec.on_inconclusive}"
    if spec.on_inconclusive == "rollback":
        return _move(state, now, "rolled_back", 0, reason)
    if spec.on_inconclusive == "promote":
        return _move(state, now, "promoted", 100, reason)
    outcome = _move(state, now, "inconclusive", state.weight, reason)
    return Outcome(replace(outcome.state, short_intervals=short), outcome.events)
