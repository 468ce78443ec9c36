"""Where quota counters live: the CounterStore protocol (memory and Redis implement it).

A request's quota checks are settled in one atomic step (`admit`): either every counter is
charged its cost, or, when any budget is exceeded, none is. Token usage reported after the
response is charged with `charge`, which never refuses (the tokens are already spent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Algorithm = Literal["sliding", "fixed"]


class StoreUnavailable(Exception):
    """The store could not be reached or failed; the policy's on_error decides.

    `kept` names the counters whose costs surely stay charged (a store that failed part-way
    through an admission and could not return them), charged at the store's clock `at`: a request
    admitted by `on_error: allow` has reserved those. A cost whose return may have happened is
    not named (counting it twice is the safe error).
    """

    def __init__(self, message: str, *, kept: frozenset[str] = frozenset(), at: float | None = None) -> None:
        super().__init__(message)
        self.kept = kept
        self.at = at


@dataclass(frozen=True)
class Demand:
    """What one request asks of one counter."""

    counter: str  # stable id, e.g. "tier-quotas/free-requests/requests/acme"
    hash_tag: str  # counters sharing a tag are settled atomically together (one Redis slot)
    limit: int
    window: float  # seconds
    algorithm: Algorithm
    cost: int  # charged when admitted (1 request, or a token estimate reserved)
    # requests: refused when used + cost > limit. tokens: refused when used >= limit.
    refuse_at_limit: bool


def exceeds(used: int, cost: int, limit: int, refuse_at_limit: bool) -> bool:
    """The one admission rule. Requests need room for this one; token budgets only need some
    budget left, because the real count is known after the response (the cost is an estimate)."""
    return used >= limit if refuse_at_limit else used + cost > limit


@dataclass(frozen=True)
class CounterState:
    counter: str
    used: int  # usage in the window BEFORE this request's charge
    reset_s: float  # seconds until enough of the window has passed to free budget
    exceeded: bool


@dataclass(frozen=True)
class Admission:
    admitted: bool  # every demand was within budget and all were charged
    states: tuple[CounterState, ...]  # same order as the demands
    # The store's clock when it charged: names the buckets the costs went into, so that a
    # reservation returned later comes out of the same bucket (charge's `reserved_at`).
    at: float


@dataclass(slots=True)  # not frozen: built per charge, and a frozen one costs twice as much
class Charge:
    """Usage charged to one counter after a response: CounterStore.charge's arguments."""

    counter: str
    hash_tag: str
    window: float
    algorithm: Algorithm
    amount: int
    reserved_at: float | None = None


class CounterStore(Protocol):
    async def admit(self, demands: Sequence[Demand]) -> Admission:
        """Check every demand; charge all of them only if none is exceeded."""
        ...

    async def charge(
        self,
        counter: str,
        hash_tag: str,
        window: float,
        algorithm: Algorithm,
        amount: int,
        reserved_at: float | None = None,
    ) -> int:
        """Add `amount`; the new usage.

        A negative amount returns (part of) a reservation. With `reserved_at`, the `at` of the
        admission that reserved it, it comes out of the bucket the reservation went into, and
        only while that bucket still counts (the previous one, the current one, or one this
        clock has not reached, if a replica whose clock runs ahead reserved it): taking it from
        another bucket would erase other requests' usage. Without, it comes out of the current
        bucket, then the previous one. Never below zero.
        """
        ...

    async def charge_many(self, charges: Sequence[Charge]) -> list[StoreUnavailable | None]:
        """Apply each charge as `charge` does, in order, in as few round trips as the store
        can (the charges sharing a hash tag together); per charge, why it failed (None: done).
        Charges that fail together are never partly applied."""
        ...

    async def usage(self, counter: str, hash_tag: str, window: float, algorithm: Algorithm) -> int:
        """Current usage in the window."""
        ...

    async def close(self) -> None: ...
