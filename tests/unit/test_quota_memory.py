"""MemoryStore: window arithmetic on a fake clock, atomic admission, refunds, the memory bound."""

from __future__ import annotations

import asyncio
import copy
import math

import pytest

from policy_engine.quota.memory import MIN_RESET_S, MemoryStore, reset_after, window_position
from policy_engine.quota.store import Algorithm, Demand

# Bucket-aligned for every window used below, and exactly representable with the fractions we
# add, so the expected values need no float tolerance.
T0 = 1_699_999_200.0  # 472222 * 3600


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def demand(
    counter: str = "c",
    *,
    limit: int = 10,
    window: float = 8.0,
    algorithm: Algorithm = "sliding",
    cost: int = 1,
    refuse_at_limit: bool = False,
    hash_tag: str = "tenant",
) -> Demand:
    return Demand(counter, hash_tag, limit, window, algorithm, cost, refuse_at_limit)


def make() -> tuple[MemoryStore, FakeClock]:
    clock = FakeClock()
    return MemoryStore(clock=clock), clock


def test_fixed_window_counts_the_current_bucket_only() -> None:
    async def scenario() -> None:
        store, clock = make()
        d = demand(limit=3, algorithm="fixed")
        results = [await store.admit([d]) for _ in range(4)]
        assert [r.admitted for r in results] == [True, True, True, False]
        assert [r.states[0].used for r in results] == [0, 1, 2, 3]
        assert results[3].states[0].exceeded
        clock.now += 7.5
        assert await store.usage("c", "tenant", 8.0, "fixed") == 3
        clock.now += 0.5  # the next bucket begins: the budget is back in full
        assert await store.usage("c", "tenant", 8.0, "fixed") == 0
        assert (await store.admit([d])).admitted

    asyncio.run(scenario())


def test_sliding_window_weights_the_previous_bucket() -> None:
    async def scenario() -> None:
        store, clock = make()
        assert await store.charge("c", "tenant", 8.0, "sliding", 8) == 8
        clock.now += 8.0 + 2.0  # next bucket, a quarter in: 3/4 of the previous still counts
        assert await store.usage("c", "tenant", 8.0, "sliding") == 6
        assert await store.charge("c", "tenant", 8.0, "sliding", 1) == 7
        clock.now += 0.5  # 8 * 0.6875 = 5.5, rounded down
        assert await store.usage("c", "tenant", 8.0, "sliding") == 1 + 5
        assert await store.usage("c", "tenant", 8.0, "fixed") == 1
        clock.now += 5.0  # elapsed 7.5: 8 * (1/16) = 0.5
        assert await store.usage("c", "tenant", 8.0, "sliding") == 1
        clock.now += 0.5  # the 8 are two buckets old now; the 1 is the previous bucket, weight 1
        assert await store.usage("c", "tenant", 8.0, "sliding") == 1
        clock.now += 8.0
        assert await store.usage("c", "tenant", 8.0, "sliding") == 0

    asyncio.run(scenario())


def test_sliding_admission_uses_the_weighted_usage() -> None:
    async def scenario() -> None:
        store, clock = make()
        await store.charge("c", "tenant", 8.0, "sliding", 10)
        clock.now += 8.0 + 4.0  # half of the previous 10 still counts
        d = demand(limit=8)
        results = [await store.admit([d]) for _ in range(4)]
        assert [r.states[0].used for r in results] == [5, 6, 7, 8]
        assert [r.admitted for r in results] == [True, True, True, False]

    asyncio.run(scenario())


def test_reset_s_for_fixed_windows_is_the_time_to_the_bucket_end() -> None:
    async def scenario() -> None:
        store, clock = make()
        clock.now += 8.0 * 5 + 3.0
        result = await store.admit([demand(algorithm="fixed")])
        assert result.states[0].reset_s == 5.0

    asyncio.run(scenario())


def test_reset_s_for_sliding_windows_is_when_one_unit_decays() -> None:
    async def scenario() -> None:
        store, clock = make()
        await store.charge("c", "tenant", 8.0, "sliding", 8)
        clock.now += 8.0 + 2.5
        state = (await store.admit([demand(cost=0)])).states[0]
        # weight 0.6875: 8 * 0.6875 = 5.5 -> 5; it reaches exactly 5 at elapsed 3 and drops just after.
        assert state.used == 5
        assert state.reset_s == pytest.approx(0.5)

    asyncio.run(scenario())


@pytest.mark.parametrize("current", [0, 1, 7])
@pytest.mark.parametrize("previous", [0, 1, 3, 8, 1000])
@pytest.mark.parametrize("elapsed", [0.0, 0.3, 1.0, 2.5, 4.0, 6.9, 7.999])
def test_sliding_reset_estimate_frees_one_unit(current: int, previous: int, elapsed: float) -> None:
    """The estimate lands where the usage first drops (or at the bucket end when nothing decays)."""
    window = 8.0

    def used_at(e: float) -> int:
        return math.floor(current + previous * (1 - e / window))

    position = window_position(T0 + elapsed, window)
    used = used_at(elapsed)
    reset = reset_after("sliding", window, position, current, previous, used)
    assert MIN_RESET_S <= reset <= window
    if elapsed + reset < window and used > current:
        assert used_at(elapsed + reset + 1e-6) == used - 1
        if reset > MIN_RESET_S:
            assert used_at(elapsed + reset - 1e-6) == used
    else:
        # Nothing of the previous bucket is left to decay in this bucket.
        assert reset == pytest.approx(window - elapsed)


@pytest.mark.parametrize("algorithm", ["sliding", "fixed"])
@pytest.mark.parametrize("refuse_at_limit", [True, False])
@pytest.mark.parametrize("current", [0, 3, 10, 15, 40])
@pytest.mark.parametrize("previous", [0, 6, 10, 25, 1000])
@pytest.mark.parametrize("elapsed", [0.0, 1.0, 4.0, 7.5])
def test_a_refused_demand_is_admitted_when_its_retry_after_says(
    algorithm: Algorithm, refuse_at_limit: bool, current: int, previous: int, elapsed: float
) -> None:
    """Even with the budget overshot (token usage beyond its estimate): retrying when the 429
    says succeeds, assuming no other traffic, and retrying much earlier does not."""
    window, limit, cost = 8.0, 10, 3

    async def scenario() -> None:
        store, clock = make()
        if previous:
            await store.charge("c", "tenant", window, algorithm, previous)
        clock.now += window
        if current:
            await store.charge("c", "tenant", window, algorithm, current)
        clock.now += elapsed
        asked = demand(limit=limit, cost=cost, refuse_at_limit=refuse_at_limit, algorithm=algorithm)
        admission = await store.admit([asked])
        if admission.admitted:
            return
        (state,) = admission.states
        assert MIN_RESET_S <= state.reset_s <= 2 * window
        later = MemoryStore(clock=lambda: clock.now + state.reset_s + 1e-3)
        earlier = MemoryStore(clock=lambda: clock.now + state.reset_s * 0.9 - 1e-3)
        for replay in (later, earlier):
            replay._counters = copy.deepcopy(store._counters)  # the same buckets, at another time
        assert (await later.admit([asked])).admitted
        if state.reset_s * 0.9 - 1e-3 > 0:
            assert not (await earlier.admit([asked])).admitted

    asyncio.run(scenario())


def test_reset_s_is_positive_and_within_the_window_at_boundaries() -> None:
    for now in (T0, T0 + 8.0, math.nextafter(T0 + 8.0, 0.0), T0 + 1e-9):
        for algorithm in ("fixed", "sliding"):
            position = window_position(now, 8.0)
            assert 0 <= position.elapsed < 8.0
            for previous in (0, 5):
                reset = reset_after(algorithm, 8.0, position, 0, previous, 0)
                assert 0 < reset <= 8.0


def test_refusal_is_atomic_and_charges_nothing() -> None:
    async def scenario() -> None:
        store, _ = make()
        await store.charge("full", "tenant", 8.0, "fixed", 5)
        ok = demand("ok", limit=100, algorithm="fixed", cost=3)
        full = demand("full", limit=5, algorithm="fixed")
        other_tag = demand("elsewhere", limit=100, hash_tag="other", cost=2)
        result = await store.admit([ok, full, other_tag])
        assert not result.admitted
        assert [s.counter for s in result.states] == ["ok", "full", "elsewhere"]
        assert [s.exceeded for s in result.states] == [False, True, False]
        assert [s.used for s in result.states] == [0, 5, 0]
        assert await store.usage("ok", "tenant", 8.0, "fixed") == 0
        assert await store.usage("full", "tenant", 8.0, "fixed") == 5
        assert await store.usage("elsewhere", "other", 8.0, "fixed") == 0
        assert len(store) == 1  # refused demands do not even create counters

    asyncio.run(scenario())


def test_admission_charges_every_demand() -> None:
    async def scenario() -> None:
        store, _ = make()
        result = await store.admit([demand("a", cost=2), demand("b", cost=3, hash_tag="x")])
        assert result.admitted
        assert [s.used for s in result.states] == [0, 0]
        assert await store.usage("a", "tenant", 8.0, "sliding") == 2
        assert await store.usage("b", "x", 8.0, "sliding") == 3

    asyncio.run(scenario())


def test_token_budgets_refuse_only_once_the_limit_is_reached() -> None:
    async def scenario() -> None:
        store, _ = make()
        await store.charge("tokens", "tenant", 8.0, "fixed", 90)
        tokens = demand("tokens", limit=100, algorithm="fixed", cost=50, refuse_at_limit=True)
        requests = demand("tokens", limit=100, algorithm="fixed", cost=50, refuse_at_limit=False)
        # As a request budget, 90 + 50 > 100 refuses; as a token budget 90 < 100 admits.
        assert not (await store.admit([requests])).admitted
        first = await store.admit([tokens])
        assert first.admitted and first.states[0].used == 90
        # The overshoot is kept (the tokens were spent); the next request finds the budget gone.
        second = await store.admit([tokens])
        assert not second.admitted
        assert second.states[0].used == 140 and second.states[0].exceeded
        at_limit = MemoryStore(clock=FakeClock())
        await at_limit.charge("tokens", "tenant", 8.0, "fixed", 100)
        assert not (await at_limit.admit([tokens])).admitted

    asyncio.run(scenario())


def test_negative_charges_never_go_below_zero() -> None:
    async def scenario() -> None:
        store, _ = make()
        assert await store.charge("c", "tenant", 8.0, "fixed", 3) == 3
        assert await store.charge("c", "tenant", 8.0, "fixed", -5) == 0
        assert await store.charge("c", "tenant", 8.0, "fixed", 2) == 2
        # Refunding a counter that does not exist neither fails nor creates it.
        assert await store.charge("missing", "tenant", 8.0, "fixed", -5) == 0
        assert len(store) == 1

    asyncio.run(scenario())


def test_refunds_spill_into_the_previous_bucket() -> None:
    async def scenario() -> None:
        store, clock = make()
        await store.charge("c", "tenant", 8.0, "sliding", 4)  # a reservation ...
        clock.now += 8.0  # ... returned after the bucket boundary
        await store.charge("c", "tenant", 8.0, "sliding", 2)
        assert await store.charge("c", "tenant", 8.0, "sliding", -5) == 1  # current 0, previous 1
        assert await store.usage("c", "tenant", 8.0, "fixed") == 0
        assert await store.charge("c", "tenant", 8.0, "sliding", -5) == 0

    asyncio.run(scenario())


def test_a_clock_stepping_back_forgets_no_usage() -> None:
    async def scenario() -> None:
        store, clock = make()
        clock.now += 8.0  # just after a boundary
        full = demand(limit=5, algorithm="fixed")
        for _ in range(5):
            assert (await store.admit([full])).admitted
        clock.now -= 0.001  # NTP steps the clock back across the boundary ...
        assert not (await store.admit([full])).admitted
        clock.now += 0.002  # ... and forward again
        assert not (await store.admit([full])).admitted
        assert await store.usage("c", "tenant", 8.0, "fixed") == 5

    asyncio.run(scenario())


def test_counters_are_bounded_expired_first_then_least_recently_used() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock, max_counters=3)
        await store.charge("a", "t", 1.0, "fixed", 1)
        await store.charge("b", "t", 1.0, "fixed", 1)
        await store.charge("c", "t", 100.0, "fixed", 1)
        clock.now += 5.0  # a and b are more than two windows old
        await store.charge("d", "t", 100.0, "fixed", 1)
        assert len(store) == 2
        await store.charge("e", "t", 100.0, "fixed", 1)
        await store.usage("c", "t", 100.0, "fixed")  # touching c makes d the least recently used
        await store.charge("f", "t", 100.0, "fixed", 1)
        assert len(store) == 3
        assert await store.usage("c", "t", 100.0, "fixed") == 1
        assert await store.usage("d", "t", 100.0, "fixed") == 0  # evicted
        for i in range(50):
            await store.charge(f"n{i}", "t", 100.0, "fixed", 1)
            assert len(store) <= 3

    asyncio.run(scenario())


def test_a_changed_window_starts_the_counter_afresh() -> None:
    async def scenario() -> None:
        store, _ = make()
        await store.charge("c", "tenant", 8.0, "fixed", 5)
        assert await store.usage("c", "tenant", 16.0, "fixed") == 0
        assert await store.charge("c", "tenant", 16.0, "fixed", 1) == 1

    asyncio.run(scenario())


def test_concurrent_admissions_never_overshoot() -> None:
    async def scenario() -> None:
        store, _ = make()
        d = demand(limit=50, window=60.0)
        results = await asyncio.gather(*(store.admit([d]) for _ in range(200)))
        assert sum(r.admitted for r in results) == 50
        assert await store.usage("c", "tenant", 60.0, "sliding") == 50

    asyncio.run(scenario())


def test_invalid_demands_are_rejected() -> None:
    store, _ = make()
    with pytest.raises(ValueError, match="cost"):
        asyncio.run(store.admit([demand(cost=-1)]))
    for window in (0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="window"):
            asyncio.run(store.admit([demand(window=window)]))
        with pytest.raises(ValueError, match="window"):
            asyncio.run(store.charge("c", "tenant", window, "fixed", 1))
    with pytest.raises(ValueError, match="max_counters"):
        MemoryStore(max_counters=0)


def test_empty_admission_is_admitted() -> None:
    store, _ = make()
    assert asyncio.run(store.admit([])).admitted
