"""The rollout state machine: every transition, plus properties over random histories."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.canary.machine import UNAVAILABLE, Reading, RolloutSpec, Verdict, advance, start
from policy_engine.canary.state import TERMINAL, Counts, RolloutState

SPEC = RolloutSpec((5, 10, 25, 50, 100), 60.0, 20, 3, "hold")


def healthy(_: Counts) -> Verdict:
    return Verdict(True, "ok")


def unhealthy(_: Counts) -> Verdict:
    return Verdict(False, "error rate too high")


def broken(_: Counts) -> Verdict:
    return Verdict(None, "no such field")


def reading(canary: int, stable: int = 0, errors: int = 0, source: str = "s") -> Reading:
    return Reading(source, Counts(canary, errors, stable, 0))


def begin(spec: RolloutSpec = SPEC) -> RolloutState:
    return start("c", "rev", spec, reading(0), 1000.0).state


def test_start_is_the_first_step_and_is_recorded() -> None:
    outcome = start("c", "rev", SPEC, reading(7), 1000.0)
    assert (outcome.state.phase, outcome.state.step, outcome.state.weight) == ("progressing", 0, 5)
    assert outcome.state.seen.canary_requests == 7 and outcome.state.window == Counts()
    assert [e.reason for e in outcome.events] == ["rollout started"]


def test_nothing_happens_before_the_interval_ends() -> None:
    state = begin()
    outcome = advance(state, SPEC, reading(100), 1059.0, unhealthy)
    assert outcome.events == () and outcome.state.phase == "progressing"
    assert outcome.state.window.canary_requests == 100  # traffic is still counted


def test_healthy_steps_advance_until_promoted() -> None:
    state, now, total = begin(), 1000.0, 0
    weights = []
    for _ in SPEC.steps:
        now += 60
        total += 25
        outcome = advance(state, SPEC, reading(total), now, healthy)
        state = outcome.state
        weights.append(state.weight)
        assert len(outcome.events) == 1
    assert weights == [10, 25, 50, 100, 100]
    assert state.phase == "promoted"
    assert state.history[-1].reason == "analysis passed at the last step"


def test_each_step_starts_with_an_empty_window() -> None:
    state = advance(begin(), SPEC, reading(25), 1060.0, healthy).state
    assert state.step == 1 and state.window == Counts() and state.step_started_at == 1060.0
    state = advance(state, SPEC, reading(30), 1070.0, healthy).state
    assert state.window.canary_requests == 5


def test_unhealthy_analysis_rolls_back() -> None:
    outcome = advance(begin(), SPEC, reading(25, errors=20), 1060.0, unhealthy)
    assert (outcome.state.phase, outcome.state.weight) == ("rolled_back", 0)
    assert outcome.events[0].analysis == "error rate too high"


def test_nothing_to_compare_with_ends_inconclusive_not_rolled_back() -> None:
    def no_stable(_: Counts) -> Verdict:
        return Verdict(None, "no telemetry for the stable backend 'v1'", conclusive=False)

    state, now = begin(), 1000.0
    for interval in range(1, SPEC.inconclusive_after + 1):
        now += 60
        outcome = advance(state, SPEC, reading(25 * interval), now, no_stable)
        state = outcome.state
        assert state.phase != "rolled_back" and state.weight == 5
    assert state.phase == "inconclusive"
    assert "no telemetry for the stable backend 'v1' after 3 interval(s)" in state.history[-1].reason


def test_an_analysis_that_cannot_be_evaluated_rolls_back() -> None:
    outcome = advance(begin(), SPEC, reading(25), 1060.0, broken)
    assert outcome.state.phase == "rolled_back"
    assert outcome.events[0].reason == "analysis could not be evaluated"


def test_low_traffic_waits_then_is_explicitly_inconclusive() -> None:
    state = begin()
    for interval in (1, 2):
        outcome = advance(state, SPEC, reading(3 * interval), 1000.0 + 60 * interval, unhealthy)
        state = outcome.state
        assert outcome.events == () and state.phase == "progressing" and state.short_intervals == interval
        assert "canary requests after" in state.last_analysis
    outcome = advance(state, SPEC, reading(9), 1180.0, unhealthy)
    assert outcome.state.phase == "inconclusive" and outcome.state.weight == 5
    assert "inconclusive: 9/20" in outcome.events[0].reason


def test_inconclusive_hold_resumes_once_traffic_arrives() -> None:
    state = begin()
    for interval in (1, 2, 3):
        state = advance(state, SPEC, reading(0), 1000.0 + 60 * interval, healthy).state
    assert state.phase == "inconclusive"
    quiet = advance(state, SPEC, reading(0), 1240.0, healthy)
    assert quiet.state.phase == "inconclusive" and quiet.events == ()  # no repeated event
    outcome = advance(quiet.state, SPEC, reading(20), 1300.0, healthy)
    assert (outcome.state.phase, outcome.state.weight) == ("progressing", 10)
    assert outcome.events[0].from_phase == "inconclusive"


def test_inconclusive_actions_rollback_and_promote() -> None:
    for action, phase, weight in (("rollback", "rolled_back", 0), ("promote", "promoted", 100)):
        spec = replace(SPEC, on_inconclusive=action, inconclusive_after=1)
        outcome = advance(begin(spec), spec, reading(0), 1060.0, healthy)
        assert (outcome.state.phase, outcome.state.weight) == (phase, weight)


def test_commands_apply_at_once() -> None:
    state = begin()
    promoted = advance(state, SPEC, reading(0), 1001.0, unhealthy, "promote").state
    assert (promoted.phase, promoted.weight) == ("promoted", 100)
    aborted = advance(state, SPEC, reading(0), 1001.0, healthy, "abort").state
    assert (aborted.phase, aborted.weight) == ("aborted", 0)
    restarted = advance(aborted, SPEC, reading(0), 1002.0, healthy, "restart").state
    assert (restarted.phase, restarted.weight, restarted.step) == ("progressing", 5, 0)


def test_terminal_phases_stay_without_commands() -> None:
    state = advance(begin(), SPEC, reading(25), 1060.0, unhealthy).state
    later = advance(state, SPEC, reading(500), 5000.0, healthy)
    assert later.state.phase == "rolled_back" and later.events == ()


def test_a_restarted_counter_source_counts_from_zero() -> None:
    state = advance(begin(), SPEC, reading(12), 1010.0, healthy).state
    assert state.window.canary_requests == 12
    state = advance(state, SPEC, reading(5, source="new"), 1020.0, healthy).state
    assert state.window.canary_requests == 17
    state = advance(state, SPEC, reading(2, source="new"), 1030.0, healthy).state  # went down: reset
    assert state.window.canary_requests == 19


def test_state_round_trips_through_json() -> None:
    state = advance(begin(), SPEC, reading(25), 1060.0, healthy).state
    assert RolloutState.from_json(state.to_json()) == state


tick = st.tuples(
    st.floats(min_value=0.0, max_value=200.0),  # seconds since the previous tick
    st.integers(min_value=0, max_value=40),  # canary requests since then
    st.sampled_from([True, False, None]),  # the verdict, if analysed
    st.sampled_from([None, None, None, None, "promote", "abort", "restart"]),
)
specs = st.builds(
    RolloutSpec,
    st.lists(st.integers(1, 100), min_size=1, max_size=6, unique=True).map(lambda s: tuple(sorted(s))),
    st.floats(min_value=1.0, max_value=120.0),
    st.integers(0, 50),
    st.integers(1, 5),
    st.sampled_from(["hold", "rollback", "promote"]),
)


@settings(max_examples=300, deadline=None)
@given(specs, st.lists(tick, max_size=40))
def test_properties_over_random_histories(
    spec: RolloutSpec, ticks: list[tuple[float, int, bool | None, str | None]]
) -> None:
    state = start("c", "rev", spec, reading(0), 0.0).state
    now, total = 0.0, 0
    allowed = {*spec.steps, 0, 100}
    for gap, requests, verdict, command in ticks:
        now += gap
        total += requests
        judged = Verdict(verdict, "v")
        outcome = advance(state, spec, reading(total), now, lambda _, v=judged: v, command)  # type: ignore[arg-type, misc]
        new = outcome.state
        # The weight is always one of the steps, or 0 / 100.
        assert new.weight in allowed
        # Every change of phase or weight is a recorded transition.
        if (new.phase, new.weight) != (state.phase, state.weight):
            assert len(outcome.events) == 1 and outcome.events[0].to_weight == new.weight
        # Terminal phases change only by command.
        if state.phase in TERMINAL and command is None:
            assert (new.phase, new.weight) == (state.phase, state.weight)
        state = new


@settings(max_examples=200, deadline=None)
@given(specs, st.floats(min_value=0.1, max_value=1.0))
def test_no_traffic_never_stalls_silently(spec: RolloutSpec, fraction: float) -> None:
    """Without traffic the rollout leaves `progressing` within inconclusive_after intervals, each
    seen up to one tick late."""
    if spec.min_requests == 0:
        spec = replace(spec, min_requests=1)
    state = start("c", "rev", spec, reading(0), 0.0).state
    step = spec.interval * fraction
    now = 0.0
    while now <= spec.inconclusive_after * (spec.interval + step) + step:
        now += step
        state = advance(state, spec, reading(0), now, healthy).state
    assert state.phase in ("inconclusive", "rolled_back", "promoted")
    assert state.history[-1].reason.startswith("inconclusive")


def test_a_first_reading_after_no_telemetry_is_only_a_baseline() -> None:
    blind = start("c", "rev", SPEC, Reading(UNAVAILABLE, Counts()), 1000.0).state
    state = advance(blind, SPEC, reading(60, stable=10_000, errors=5, source="hub"), 1010.0, healthy).state
    assert state.window == Counts() and state.source == "hub"
    state = advance(state, SPEC, reading(64, stable=10_010, source="hub"), 1020.0, healthy).state
    assert (state.window.canary_requests, state.window.stable_requests) == (4, 10)


def test_an_outage_of_telemetry_keeps_the_baseline() -> None:
    state = advance(begin(), SPEC, reading(10, source="s"), 1010.0, healthy).state
    state = advance(state, SPEC, Reading(UNAVAILABLE, Counts()), 1020.0, healthy).state
    assert state.source == "s" and state.window.canary_requests == 10
    state = advance(state, SPEC, reading(15, source="s"), 1030.0, healthy).state
    assert state.window.canary_requests == 15  # the outage's traffic counts once, when seen
