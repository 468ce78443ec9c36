"""The default counter store: one process, in memory.

Both windows are built from fixed buckets of `window` seconds, numbered `floor(now / window)`:

- fixed: usage is the current bucket.
- sliding: the "sliding window counter" approximation (as in Cloudflare's and Envoy's limiters),
  usage = floor(current + previous * (1 - elapsed / window)), where `elapsed` is the time since
  the current bucket began. It assumes the previous bucket's requests were spread evenly.

The window arithmetic below is shared with the Redis store, which computes the same bucket
indices and weights on the client and hands them to its script, so both stores give identical
answers for identical inputs (the integration tests hold them to that).

A counter is identified by (hash_tag, counter); its window is expected to stay the same. Should it
change (a policy edit), the memory store starts that counter afresh rather than read buckets that
were numbered for another window.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from policy_engine.quota.store import (
    Admission,
    Algorithm,
    Charge,
    CounterState,
    Demand,
    StoreUnavailable,
    exceeds,
)

# reset_s is documented as > 0: a caller sleeping for it must make progress, and "0" would read as
# "retry now" exactly when the usage sits on a bucket-weight boundary.
MIN_RESET_S = 0.001


@dataclass(frozen=True)
class WindowPosition:
    """Where `now` falls in the bucket grid of one window length."""

    index: int  # the current bucket: floor(now / window)
    elapsed: float  # seconds since the current bucket began, in [0, window)


def window_position(now: float, window: float) -> WindowPosition:
    index = math.floor(now / window)
    # now / window can round up to the next integer just before a boundary; clamping keeps the
    # weight within [0, 1] instead of letting a rounding error count a bucket twice.
    elapsed = min(max(now - index * window, 0.0), math.nextafter(window, 0.0))
    return WindowPosition(index, elapsed)


def previous_weight(algorithm: Algorithm, position: WindowPosition, window: float) -> float:
    """How much of the previous bucket still counts: 0 for fixed windows."""
    if algorithm == "fixed":
        return 0.0
    return 1.0 - position.elapsed / window


def weighted_usage(current: int, previous: int, weight: float) -> int:
    # The Redis script evaluates exactly this expression in the same (IEEE double) arithmetic,
    # with `weight` passed in as its shortest round-trip repr: keep the two in step.
    return math.floor(current + previous * weight)


def is_exceeded(demand: Demand, used: int) -> bool:
    return exceeds(used, demand.cost, demand.limit, demand.refuse_at_limit)


def reset_after(
    algorithm: Algorithm, window: float, position: WindowPosition, current: int, previous: int, used: int
) -> float:
    """Seconds until one unit of budget is freed (an estimate for sliding windows).

    fixed: the time to the end of the current bucket, when the whole budget returns.

    sliding: usage falls by one once previous * (1 - e/window) < used - current, i.e. once the
    elapsed fraction passes 1 - (used - current) / previous; the estimate is the time until then.
    Without a previous bucket nothing decays before the current bucket ends, so the estimate is
    the time to its end (the current bucket then starts decaying as the previous one).
    Assumes no further charges meanwhile; clamped to [MIN_RESET_S, window].
    """
    to_end = window - position.elapsed
    if algorithm == "fixed" or previous <= 0:
        seconds = to_end
    else:
        seconds = (1.0 - (used - current) / previous) * window - position.elapsed
    return min(max(seconds, min(MIN_RESET_S, window)), window)


def admitted_after(
    algorithm: Algorithm, window: float, position: WindowPosition, current: int, previous: int, most: int
) -> float:
    """Seconds until the usage is at most `most` (an estimate for sliding windows): when a
    refused demand would be admitted, assuming no further charges.

    Unlike reset_after this counts more than one unit: a token budget is routinely overshot
    (the real usage exceeds the estimate), and freeing one unit then admits nothing. With
    sliding windows the usage floor(current + previous * (1 - e/window)) is at most `most` once
    the weighted part of the previous bucket falls below most + 1 - current; when the current
    bucket alone is above that, not before it has become the previous bucket and decayed in
    turn. Clamped to [MIN_RESET_S, 2 * window]; a budget that can never admit gets the maximum.
    """
    to_end = window - position.elapsed
    below = most + 1 - current  # what the previous bucket's weighted part must fall under
    if algorithm == "fixed":
        seconds = to_end if most >= 0 else 2 * window
    elif below > 0:
        seconds = (1.0 - below / previous) * window - position.elapsed if previous > 0 else 0.0
    elif most + 1 > 0:
        seconds = to_end + (1.0 - (most + 1) / current) * window
    else:
        seconds = 2 * window
    return min(max(seconds, min(MIN_RESET_S, window)), 2 * window)


def counter_state(demand: Demand, now: float, current: int, previous: int) -> CounterState:
    """The state of one demand's counter, from its two buckets before this request's charge.

    reset_s: for a demand within budget, until one unit is freed; for an exceeded one, until it
    would be admitted (the 429's retry-after)."""
    position = window_position(now, demand.window)
    used = weighted_usage(current, previous, previous_weight(demand.algorithm, position, demand.window))
    exceeded = is_exceeded(demand, used)
    if exceeded:
        # The admission rule (quota.store.exceeds) solved for the usage.
        most = demand.limit - 1 if demand.refuse_at_limit else demand.limit - demand.cost
        reset_s = admitted_after(demand.algorithm, demand.window, position, current, previous, most)
    else:
        reset_s = reset_after(demand.algorithm, demand.window, position, current, previous, used)
    return CounterState(demand.counter, used, reset_s, exceeded)


RefundSource = Literal["current", "previous", "both", "none"]


def refund_source(current_index: int, window: float, reserved_at: float | None) -> RefundSource:
    """Which bucket a returned reservation comes out of (see CounterStore.charge).

    Without the reservation's time: the current bucket, then the previous one (a reservation
    made just before a boundary may come back just after it). With it: its own bucket while
    that still counts, else nothing. A reservation in a later bucket than the current one (made
    by a replica whose clock runs ahead) is in neither: the Redis store returns it to that
    bucket's own key, and a memory store, which no other clock writes, has nothing there.
    """
    if reserved_at is None:
        return "both"
    index = window_position(reserved_at, window).index
    if index == current_index:
        return "current"
    return "previous" if index == current_index - 1 else "none"


def bucket_ttl_ms(window: float) -> int:
    """How long a bucket must live: it is read as the previous bucket for one window after its own."""
    return max(1, math.ceil(2 * window * 1000))


def check_window(counter: str, window: float) -> None:
    """Both stores' one rule for a counter's window: positive and finite."""
    if not math.isfinite(window) or window <= 0:
        raise ValueError(f"counter {counter!r}: window must be positive, got {window}")


def validate_demands(demands: Sequence[Demand]) -> None:
    for demand in demands:
        check_window(demand.counter, demand.window)
        if demand.cost < 0:
            # A refund is a charge() with a negative amount; a negative cost in admit would let a
            # request through while lowering the usage others are checked against.
            raise ValueError(f"counter {demand.counter!r}: cost must be >= 0, got {demand.cost}")


@dataclass
class _Counter:
    window: float
    index: int  # bucket number of `current`
    current: int = 0
    previous: int = 0  # bucket index - 1

    def advance(self, index: int) -> None:
        """Roll the buckets forward to `index`; buckets older than two windows are dropped here."""
        if index <= self.index:  # the store's clock never goes back (MemoryStore._now)
            return
        self.previous = self.current if index == self.index + 1 else 0
        self.current = 0
        self.index = index

    def expired(self, now: float) -> bool:
        # Empty buckets (everything refunded) describe the same usage as no counter at all.
        return window_position(now, self.window).index > self.index + 1 or (
            self.current == 0 and self.previous == 0
        )


class MemoryStore:
    """CounterStore for a single process.

    `admit` never awaits, so on one event loop it is atomic without a lock.

    Memory is bounded two ways: buckets older than two windows are dropped lazily when a counter
    is touched, and at most `max_counters` counters are kept. Creating one more first discards
    expired counters from the least-recently-used end, then, if still full, the least recently
    used counter. An evicted counter restarts at zero, so an eviction under-counts (fails open)
    for that key; size the cap above the number of keys active in two windows, and above the
    number of demands in one request.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, max_counters: int = 100_000) -> None:
        # Wall-clock time by default so that bucket boundaries agree with the Redis store's.
        if max_counters < 1:
            raise ValueError("max_counters must be at least 1")
        self._clock = clock
        self._latest = -math.inf
        self._max_counters = max_counters
        self._counters: OrderedDict[tuple[str, str], _Counter] = OrderedDict()

    def _now(self) -> float:
        # Never earlier than a reading already used: a clock stepped back (NTP) would otherwise
        # roll the buckets back and forget the usage, admitting what the budget has no room for.
        self._latest = max(self._latest, self._clock())
        return self._latest

    def __len__(self) -> int:
        """Counters currently held (expired ones included until they are discarded)."""
        return len(self._counters)

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        validate_demands(demands)
        now = self._now()
        states: list[CounterState] = []
        for demand in demands:
            index = window_position(now, demand.window).index
            counter = self._find(demand.hash_tag, demand.counter, demand.window, index)
            current, previous = (counter.current, counter.previous) if counter else (0, 0)
            states.append(counter_state(demand, now, current, previous))
        admitted = not any(state.exceeded for state in states)
        if admitted:
            for demand in demands:
                if demand.cost > 0:
                    index = window_position(now, demand.window).index
                    entry = self._get_or_create(demand.hash_tag, demand.counter, demand.window, index, now)
                    entry.current += demand.cost
        return Admission(admitted, tuple(states), now)

    async def charge(
        self,
        counter: str,
        hash_tag: str,
        window: float,
        algorithm: Algorithm,
        amount: int,
        reserved_at: float | None = None,
    ) -> int:
        check_window(counter, window)
        now = self._now()
        position = window_position(now, window)
        if amount > 0:
            entry = self._get_or_create(hash_tag, counter, window, position.index, now)
            entry.current += amount
        else:
            found = self._find(hash_tag, counter, window, position.index)
            if found is None:
                return 0
            entry = found
            refund = -amount
            source = refund_source(position.index, window, reserved_at)
            taken = min(entry.current, refund) if source in ("current", "both") else 0
            entry.current -= taken
            if source in ("previous", "both"):
                entry.previous -= min(entry.previous, refund - taken)
        return weighted_usage(entry.current, entry.previous, previous_weight(algorithm, position, window))

    async def charge_many(self, charges: Sequence[Charge]) -> list[StoreUnavailable | None]:
        for c in charges:
            await self.charge(c.counter, c.hash_tag, c.window, c.algorithm, c.amount, c.reserved_at)
        return [None] * len(charges)

    async def usage(self, counter: str, hash_tag: str, window: float, algorithm: Algorithm) -> int:
        position = window_position(self._now(), window)
        entry = self._find(hash_tag, counter, window, position.index)
        if entry is None:
            return 0
        return weighted_usage(entry.current, entry.previous, previous_weight(algorithm, position, window))

    async def close(self) -> None:
        self._counters.clear()

    def _find(self, hash_tag: str, counter: str, window: float, index: int) -> _Counter | None:
        key = (hash_tag, counter)
        entry = self._counters.get(key)
        if entry is None:
            return None
        if entry.window != window:
            del self._counters[key]
            return None
        entry.advance(index)
        self._counters.move_to_end(key)
        return entry

    def _get_or_create(self, hash_tag: str, counter: str, window: float, index: int, now: float) -> _Counter:
        entry = self._find(hash_tag, counter, window, index)
        if entry is not None:
            return entry
        self._make_room(now)
        entry = _Counter(window, index)
        self._counters[(hash_tag, counter)] = entry
        return entry

    def _make_room(self, now: float) -> None:
        # Expired counters gather at the least-recently-used end, so sweeping from there frees
        # them in amortised O(1) per insertion without a background task.
        while self._counters:
            oldest = next(iter(self._counters.values()))
            if not oldest.expired(now):
                break
            self._counters.popitem(last=False)
        while len(self._counters) >= self._max_counters:
            self._counters.popitem(last=False)
