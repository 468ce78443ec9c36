"""RedisStore against a real server: parity with MemoryStore, key layout, atomicity, failures.

Stores are given generous timeouts (the default is 50 ms): these tests check behaviour, not
speed, and a loaded CI machine must not turn them flaky.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.redis_store import RedisStore
from policy_engine.quota.resp import RedisLost, RedisUnreachable
from policy_engine.quota.store import Admission, Algorithm, Charge, CounterStore, Demand, StoreUnavailable
from tests.redis_server import RedisProcess, start_redis

# Hour-aligned, so every window below starts a bucket here.
T0 = 1_699_999_200.0
FAILURE_BOUND_S = 5.0  # only "reported rather than hung"; no speed assertion


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    process = start_redis()
    yield process
    process.close()


@pytest.fixture
def prefix() -> str:
    # Each test has its own key space on the shared server.
    return f"pe-test-{uuid.uuid4().hex[:12]}:"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def demand(
    counter: str = "c",
    *,
    limit: int = 10,
    window: float = 60.0,
    algorithm: Algorithm = "sliding",
    cost: int = 1,
    refuse_at_limit: bool = False,
    hash_tag: str = "acme",
) -> Demand:
    return Demand(counter, hash_tag, limit, window, algorithm, cost, refuse_at_limit)


# --- parity: one scenario table, both stores -------------------------------------------------


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Admit:
    demands: tuple[Demand, ...]


@dataclass(frozen=True)
class Usage:
    counter: str
    hash_tag: str
    window: float
    algorithm: Algorithm


@dataclass(frozen=True)
class ChargeMany:
    charges: tuple[Charge, ...]


Step = Advance | Admit | Charge | ChargeMany | Usage
Outcome = Admission | int | None | tuple[int, ...]


async def play(store: CounterStore, clock: FakeClock, steps: Sequence[Step]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for step in steps:
        match step:
            case Advance(seconds):
                clock.now += seconds
                outcomes.append(None)
            case Admit(demands):
                outcomes.append(await store.admit(demands))
            case Charge(counter, hash_tag, window, algorithm, amount, reserved_at):
                outcomes.append(await store.charge(counter, hash_tag, window, algorithm, amount, reserved_at))
            case Usage(counter, hash_tag, window, algorithm):
                outcomes.append(await store.usage(counter, hash_tag, window, algorithm))
            case ChargeMany(charges):
                failures = await store.charge_many(charges)
                assert failures == [None] * len(charges)
                # What each charged counter holds afterwards.
                outcomes.append(
                    tuple([await store.usage(c.counter, c.hash_tag, c.window, c.algorithm) for c in charges])
                )
    return outcomes


def _requests(limit: int, algorithm: Algorithm = "sliding") -> Admit:
    return Admit((demand(limit=limit, algorithm=algorithm),))


SCENARIOS: dict[str, list[Step]] = {
    "fixed window fills and resets": [
        *[_requests(3, algorithm="fixed") for _ in range(4)],
        Advance(59.9),
        _requests(3, algorithm="fixed"),
        Advance(0.1),
        _requests(3, algorithm="fixed"),
        Usage("c", "acme", 60.0, "fixed"),
    ],
    "sliding window decays the previous bucket": [
        Charge("c", "acme", 60.0, "sliding", 40),
        Advance(60.0 + 17.3),
        *[_requests(24) for _ in range(8)],
        Advance(21.123456789),
        Usage("c", "acme", 60.0, "sliding"),
        Usage("c", "acme", 60.0, "fixed"),
        Advance(60.0),
        Usage("c", "acme", 60.0, "sliding"),
        Advance(120.0),
        Usage("c", "acme", 60.0, "sliding"),
    ],
    "token budget refuses at the limit, overshoot kept": [
        Charge("tok", "acme", 3600.0, "fixed", 90),
        Admit((demand("tok", limit=100, window=3600.0, algorithm="fixed", cost=50, refuse_at_limit=True),)),
        Admit((demand("tok", limit=100, window=3600.0, algorithm="fixed", cost=50, refuse_at_limit=True),)),
        Charge("tok", "acme", 3600.0, "fixed", -70),
        Admit((demand("tok", limit=100, window=3600.0, algorithm="fixed", cost=50, refuse_at_limit=False),)),
    ],
    "one exceeded demand refuses the request, across hash tags too": [
        Charge("full", "other", 60.0, "fixed", 5),
        Admit(
            (
                demand("a", limit=100, cost=3),
                demand("b", limit=100, cost=4, hash_tag="zeta"),
                demand("full", limit=5, algorithm="fixed", hash_tag="other"),
                demand("d", limit=100, cost=2, hash_tag="omega"),
            )
        ),
        Usage("a", "acme", 60.0, "sliding"),
        Usage("b", "zeta", 60.0, "sliding"),
        Usage("d", "omega", 60.0, "sliding"),
        Admit((demand("a", limit=100, cost=3), demand("b", limit=100, cost=4, hash_tag="zeta"))),
        Usage("a", "acme", 60.0, "sliding"),
        Usage("b", "zeta", 60.0, "sliding"),
    ],
    "refunds stop at zero and spill into the previous bucket": [
        Charge("r", "acme", 30.0, "sliding", 4),
        Charge("r", "acme", 30.0, "sliding", -6),
        Charge("r", "acme", 30.0, "sliding", 9),
        Advance(30.0 + 2.25),
        Charge("r", "acme", 30.0, "sliding", 2),
        Charge("r", "acme", 30.0, "sliding", -5),
        Usage("r", "acme", 30.0, "fixed"),
        Charge("r", "acme", 30.0, "sliding", -100),
        Charge("missing", "acme", 30.0, "sliding", -1),
    ],
    "a returned reservation comes out of its own bucket while it counts": [
        Advance(29.0),
        Charge("t", "acme", 30.0, "sliding", 9),  # A reserves at T0 + 29 (bucket 0) ...
        Advance(2.0),
        Charge("t", "acme", 30.0, "sliding", 7),  # ... B at T0 + 31 (bucket 1)
        Charge("t", "acme", 30.0, "sliding", -8, T0 + 29.0),  # A returns 8: from bucket 0
        Usage("t", "acme", 30.0, "fixed"),  # B's 7 untouched
        Charge("t", "acme", 30.0, "sliding", -9, T0 + 31.0),  # B returns more than it has: 0
        Charge("t", "acme", 30.0, "sliding", 5, T0 + 31.0),  # positive: the current bucket
        Advance(60.0),  # bucket 3: bucket 1 no longer counts
        Charge("t", "acme", 30.0, "sliding", 4),
        Charge("t", "acme", 30.0, "sliding", -4, T0 + 31.0),  # nothing to return any more
        Charge("t", "acme", 30.0, "sliding", -1, T0 + 200.0),  # a clock ahead: its own (empty) bucket
    ],
    "a batch of charges is each charge in order": [
        Advance(29.0),
        Charge("t", "acme", 30.0, "sliding", 9),  # a reservation at T0 + 29 (bucket 0)
        Advance(2.0),
        ChargeMany(
            (
                Charge("t", "acme", 30.0, "sliding", 5),  # the current bucket
                Charge("t", "acme", 30.0, "sliding", -3),  # the same counter again: after the 5
                Charge("t", "acme", 30.0, "sliding", -4, T0 + 29.0),  # from the reservation's bucket
                Charge("u", "globex", 60.0, "fixed", 7),  # another tag: another round trip
                Charge("t", "acme", 30.0, "sliding", -1, T0 + 200.0),  # a clock ahead: its own bucket
                Charge("v", "acme", 30.0, "fixed", -2),  # nothing to return
            )
        ),
        ChargeMany(()),
        Usage("t", "acme", 30.0, "fixed"),
    ],
    "zero-cost demands and empty requests": [
        Admit(()),
        Admit((demand(cost=0, limit=0),)),
        Admit((demand(cost=0, limit=1),)),
        Usage("c", "acme", 60.0, "sliding"),
    ],
}


def random_scenario(seed: int, steps: int = 120) -> list[Step]:
    rng = random.Random(seed)
    # A counter keeps one tag and window, as a compiled policy would; the windows stay long
    # enough that the server's real-time TTLs cannot expire keys during the test.
    counters = [
        (f"k{i}", rng.choice(["acme", "globex", "", "a}b"]), rng.choice([30.0, 45.5, 60.0, 97.3]))
        for i in range(6)
    ]
    algorithms: tuple[Algorithm, ...] = ("sliding", "fixed")
    scenario: list[Step] = []
    for _ in range(steps):
        name, tag, window = rng.choice(counters)
        algorithm = rng.choice(algorithms)
        roll = rng.random()
        if roll < 0.15:
            scenario.append(Advance(rng.choice([rng.uniform(0.0, 40.0), rng.uniform(0.0, 1.0), 60.0])))
        elif roll < 0.3:
            scenario.append(Charge(name, tag, window, algorithm, rng.randint(-8, 12)))
        elif roll < 0.4:
            scenario.append(Usage(name, tag, window, algorithm))
        elif roll < 0.5:
            batch = []
            for n, t, w in rng.choices(counters, k=rng.randint(1, 5)):
                reserved_at = rng.choice([None, T0 + rng.uniform(-60.0, 400.0)])
                batch.append(Charge(n, t, w, rng.choice(algorithms), rng.randint(-8, 12), reserved_at))
            scenario.append(ChargeMany(tuple(batch)))
        else:
            picked = rng.sample(counters, rng.randint(1, 3))
            scenario.append(
                Admit(
                    tuple(
                        Demand(
                            n,
                            t,
                            rng.randint(0, 25),
                            w,
                            rng.choice(algorithms),
                            rng.randint(0, 5),
                            rng.random() < 0.3,
                        )
                        for n, t, w in picked
                    )
                )
            )
    return scenario


ALL_SCENARIOS = {**SCENARIOS, **{f"random-{seed}": random_scenario(seed) for seed in range(8)}}


def assert_agrees_with_memory(make_store: Callable[[FakeClock], RedisStore], name: str) -> None:
    """Play a scenario on a MemoryStore and on the store `make_store` makes on the clock given:
    every step's outcome must be the same."""
    steps = ALL_SCENARIOS[name]

    async def scenario() -> tuple[list[Outcome], list[Outcome]]:
        # Start mid-bucket (and off any float-friendly value) so boundaries fall inside the run.
        memory_clock, redis_clock = FakeClock(T0 + 13.7), FakeClock(T0 + 13.7)
        memory = MemoryStore(clock=memory_clock)
        store = make_store(redis_clock)
        try:
            return await play(memory, memory_clock, steps), await play(store, redis_clock, steps)
        finally:
            await store.close()

    expected, actual = asyncio.run(scenario())
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got == want, f"step {index}: {steps[index]}"


@pytest.mark.parametrize("name", list(ALL_SCENARIOS))
def test_redis_and_memory_stores_agree(server: RedisProcess, prefix: str, name: str) -> None:
    assert_agrees_with_memory(
        lambda clock: RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=clock), name
    )


def played_on_redis(server: RedisProcess, prefix: str, name: str, start: float = T0) -> list[Outcome]:
    """One scenario of SCENARIOS against the Redis store alone, from `start` on its clock."""

    async def scenario() -> list[Outcome]:
        clock = FakeClock(start)
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=clock)
        try:
            return await play(store, clock, SCENARIOS[name])
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_a_scenario_has_the_expected_outcomes(server: RedisProcess, prefix: str) -> None:
    """Parity alone would pass if both stores were wrong the same way: pin one scenario down."""
    outcomes = played_on_redis(
        server, prefix, "one exceeded demand refuses the request, across hash tags too", T0 + 13.7
    )
    refused = outcomes[1]
    assert isinstance(refused, Admission) and not refused.admitted
    assert [s.exceeded for s in refused.states] == [False, False, True, False]
    assert outcomes[2:5] == [0, 0, 0]  # the tags admitted before the refusal were refunded
    admitted = outcomes[5]
    assert isinstance(admitted, Admission) and admitted.admitted
    assert outcomes[6:8] == [3, 4]


def test_a_returned_reservation_has_the_expected_outcomes(server: RedisProcess, prefix: str) -> None:
    outcomes = played_on_redis(
        server, prefix, "a returned reservation comes out of its own bucket while it counts"
    )
    # Usage at T0 + 31 weighs bucket 0 by 29/30; B's 7 stays in bucket 1 when A returns 8.
    assert outcomes[4:8] == [7 + math.floor(1 * 29 / 30), 7, 0, 5]
    assert outcomes[9:] == [4, 4, 4]


def test_a_batch_of_charges_has_the_expected_outcomes(server: RedisProcess, prefix: str) -> None:
    outcomes = played_on_redis(server, prefix, "a batch of charges is each charge in order")
    # Bucket 1 holds 5 - 3 = 2; bucket 0 holds 9 - 4 = 5, weighed 29/30 at T0 + 31; the refund
    # reserved ahead finds its own bucket empty, and v has nothing to return.
    sliding_t = math.floor(2 + 5 * 29 / 30)
    assert outcomes[3:] == [(sliding_t, sliding_t, sliding_t, 7, sliding_t, 0), (), 2]


def test_a_batch_fails_per_hash_tag(server: RedisProcess, prefix: str) -> None:
    """One round trip per tag: the tag whose call fails reports each of its charges as lost,
    and the other tags' charges are made."""

    async def scenario() -> tuple[list[StoreUnavailable | None], list[int]]:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock())
        run = store._run
        calls: list[int] = []

        async def zeta_fails(
            mode: str, keys: list[str], args: list[str]
        ) -> tuple[bool, list[tuple[int, int]]]:
            calls.append(len(keys) // 2)
            if "zeta" in keys[0]:
                raise StoreUnavailable("connection reset") from TIMED_OUT
            return await run(mode, keys, args)

        store._run = zeta_fails  # type: ignore[method-assign]
        try:
            failures = await store.charge_many(
                [
                    Charge("z", "zeta", 60.0, "fixed", 4),
                    Charge("a", "acme", 60.0, "fixed", 3),
                    Charge("a", "acme", 60.0, "fixed", 2),
                    Charge("y", "zeta", 60.0, "fixed", 1),
                    Charge("g", "globex", 60.0, "fixed", 6),
                ]
            )
            store._run = run  # type: ignore[method-assign]
            assert calls == [2, 2, 1]  # zeta's two charges in one call, acme's, then globex's
            tags = (("a", "acme"), ("z", "zeta"), ("g", "globex"))
            return failures, [await store.usage(c, t, 60.0, "fixed") for c, t in tags]
        finally:
            await store.close()

    failures, usages = asyncio.run(scenario())
    assert [failure is None for failure in failures] == [False, True, True, False, True]
    assert usages == [5, 0, 6]  # the tags after the failed one were charged


def test_a_refusal_stands_when_its_refund_fails(server: RedisProcess, prefix: str) -> None:
    """The counters answered (one budget is exceeded): losing the refund of the tags charged
    before must not turn the 429 into a store outage, which `on_error: allow` would admit."""

    async def scenario() -> Admission:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock())
        run = store._run

        async def refund_fails(
            mode: str, keys: list[str], args: list[str]
        ) -> tuple[bool, list[tuple[int, int]]]:
            if mode == "charge":
                raise StoreUnavailable("connection reset")
            return await run(mode, keys, args)

        store._run = refund_fails  # type: ignore[method-assign]
        try:
            return await store.admit([demand("a", limit=5), demand("b", limit=0, hash_tag="zeta")])
        finally:
            await store.close()

    admission = asyncio.run(scenario())
    assert not admission.admitted
    assert [state.exceeded for state in admission.states] == [False, True]


def test_a_server_lost_between_tags_names_what_stays_charged(server: RedisProcess, prefix: str) -> None:
    """The server dies after the first tag was charged: the refund cannot connect, so that
    charge surely stays, and the error names it (a request admitted by `on_error: allow`
    reserved it)."""

    async def scenario() -> StoreUnavailable:
        store = RedisStore(server.url, prefix=prefix, timeout_s=0.5, clock=FakeClock(T0 + 3.0))
        run = store._run

        async def dies_after_the_first_tag(
            mode: str, keys: list[str], args: list[str]
        ) -> tuple[bool, list[tuple[int, int]]]:
            if "zeta" in keys[0]:
                server.stop()
            return await run(mode, keys, args)

        store._run = dies_after_the_first_tag  # type: ignore[method-assign]
        try:
            with pytest.raises(StoreUnavailable) as failure:
                await asyncio.wait_for(
                    store.admit([demand("a", cost=3), demand("free", cost=0), demand("b", hash_tag="zeta")]),
                    FAILURE_BOUND_S,
                )
            return failure.value
        finally:
            server.restart()
            await store.close()

    error = asyncio.run(scenario())
    assert (error.kept, error.at) == (frozenset({"a"}), T0 + 3.0)


REFUSED = RedisUnreachable("cannot connect to Endpoint(127.0.0.1:6379 db=0): ConnectionRefusedError")
TIMED_OUT = RedisLost("no reply within 0.05 s")


@pytest.mark.parametrize(
    ("refund_failures", "kept"),
    [
        ({}, frozenset()),  # every refund ran: nothing stays
        ({"beta": REFUSED}, frozenset({"b"})),  # acme's came back, beta's surely did not
        ({"acme": REFUSED}, frozenset({"a", "b"})),  # the first failure stops the rest
        # A timeout may have run the refund: counted as returned, which can only overcharge.
        ({"beta": TIMED_OUT}, frozenset()),
        ({"acme": TIMED_OUT}, frozenset({"b"})),
    ],
)
def test_what_a_failed_admission_keeps_charged(
    server: RedisProcess, prefix: str, refund_failures: dict[str, Exception], kept: frozenset[str]
) -> None:
    """Tags acme and beta are charged, zeta fails; the refunds fail as given (by the client's
    own errors, raised where its calls would raise them)."""

    async def scenario() -> StoreUnavailable:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock(T0 + 3.0))
        run = store._run

        async def failing(mode: str, keys: list[str], args: list[str]) -> tuple[bool, list[tuple[int, int]]]:
            tag = keys[0].split("{")[1].split("}")[0]
            cause = refund_failures.get(tag) if mode == "charge" else None
            if tag == "zeta":
                cause = REFUSED
            if cause is not None:
                raise StoreUnavailable("redis quota store failed") from cause
            return await run(mode, keys, args)

        store._run = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(StoreUnavailable) as failure:
                await store.admit(
                    [demand("a", cost=3), demand("b", cost=2, hash_tag="beta"), demand("z", hash_tag="zeta")]
                )
            return failure.value
        finally:
            await store.close()

    error = asyncio.run(scenario())
    assert error.kept == kept and error.at == (T0 + 3.0 if kept else None)


def test_a_refusal_stands_when_a_later_tag_fails(server: RedisProcess, prefix: str) -> None:
    """acme refuses; checking zeta then fails. The refusal is the answer, not a store outage
    (which `on_error: allow` would admit)."""

    async def scenario() -> Admission:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock())
        run = store._run

        async def zeta_fails(
            mode: str, keys: list[str], args: list[str]
        ) -> tuple[bool, list[tuple[int, int]]]:
            if "zeta" in keys[0]:
                raise StoreUnavailable("connection reset") from REFUSED
            return await run(mode, keys, args)

        store._run = zeta_fails  # type: ignore[method-assign]
        try:
            return await store.admit([demand("a", limit=0), demand("b", hash_tag="zeta")])
        finally:
            await store.close()

    admission = asyncio.run(scenario())
    assert not admission.admitted
    assert [(state.counter, state.exceeded) for state in admission.states] == [("a", True)]


def test_a_reservation_from_a_replica_running_ahead_returns_to_its_own_bucket(
    server: RedisProcess, prefix: str
) -> None:
    """Replica A's clock runs 2 s ahead, across a bucket boundary: it reserves 10 in a bucket
    replica B has not reached. B charges the usage (2) and must return the 8 to that bucket,
    not take them from its current one, which holds another request's 5."""

    async def scenario() -> tuple[int, dict[str, str]]:
        ahead = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock(T0 + 61.0))
        behind = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock(T0 + 59.0))
        inspect = Redis.from_url(server.url, decode_responses=True)
        try:
            assert (await behind.admit([demand(cost=5, limit=100)])).admitted
            reservation = await ahead.admit([demand(cost=10, limit=100)])
            usage = await behind.charge("c", "acme", 60.0, "fixed", 2 - 10, reservation.at)
            buckets = {
                key.rpartition(":")[2]: await inspect.get(key)
                async for key in inspect.scan_iter(match=f"{prefix}*")
            }
            return usage, buckets
        finally:
            await inspect.aclose()
            await ahead.close()
            await behind.close()

    usage, buckets = asyncio.run(scenario())
    bucket = int(T0 // 60)
    assert buckets == {str(bucket): "5", str(bucket + 1): "2"}
    assert usage == 5  # B's own window: its current bucket (fixed window)


# --- key layout -------------------------------------------------------------------------------


def test_keys_carry_the_hash_tag_and_expire(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> None:
        clock = FakeClock(T0 + 125.0)
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=clock)
        inspect = Redis.from_url(server.url, decode_responses=True)
        try:
            await store.admit(
                [
                    demand("tier/free/requests/acme", window=60.0),
                    demand("tier/free/tokens/acme", window=3600.0, algorithm="fixed", cost=7),
                ]
            )
            await store.charge("tier/free/tokens/globex", "globex", 3600.0, "fixed", 5)
            keys = sorted([key async for key in inspect.scan_iter(match=f"{prefix}*")])
            assert keys == [
                f"{prefix}{{acme}}:tier/free/requests/acme:{int((T0 + 125.0) // 60)}",
                f"{prefix}{{acme}}:tier/free/tokens/acme:{int(T0 // 3600)}",
                f"{prefix}{{globex}}:tier/free/tokens/globex:{int(T0 // 3600)}",
            ]
            pattern = re.compile(re.escape(prefix) + r"\{(acme|globex)\}:")
            assert all(pattern.match(key) for key in keys)
            ttls = [await inspect.pttl(key) for key in keys]
            assert 0 < ttls[0] <= 120_000
            assert 0 < ttls[1] <= 7_200_000 and 0 < ttls[2] <= 7_200_000
            # Every counter of a tag hashes to one Cluster slot: the tag is the first {...}.
            assert {key.split("{", 1)[1].split("}", 1)[0] for key in keys} == {"acme", "globex"}
        finally:
            await inspect.aclose()
            await store.close()

    asyncio.run(scenario())


def test_braces_in_prefixes_are_rejected(server: RedisProcess) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(server.url, prefix="pe:{x}:")


def test_hash_tags_from_request_data_are_escaped(server: RedisProcess, prefix: str) -> None:
    """Tags are tenant names and the like: braces or an empty tag must not break the slot rule."""
    tags = ["", "%", "a}b", "{a", "%7D", "a%7Db"]

    async def scenario() -> list[str]:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock(T0))
        inspect = Redis.from_url(server.url, decode_responses=True)
        try:
            for n, tag in enumerate(tags):
                assert (await store.admit([demand(cost=n + 1, hash_tag=tag)])).admitted
            # Distinct tags stay distinct counters.
            for n, tag in enumerate(tags):
                assert await store.usage("c", tag, 60.0, "fixed") == n + 1
            return [key async for key in inspect.scan_iter(match=f"{prefix}*")]
        finally:
            await inspect.aclose()
            await store.close()

    keys = asyncio.run(scenario())
    assert len(keys) == len(tags)
    for key in keys:
        rest = key.removeprefix(prefix)
        assert rest.startswith("{")
        tag, _, tail = rest[1:].partition("}")
        assert "{" not in tag and tail == f":c:{int(T0 // 60)}"


# --- atomicity under concurrency ---------------------------------------------------------------


def test_two_pools_admit_exactly_the_limit(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> tuple[int, int]:
        clock = FakeClock(T0 + 30.0)  # fixed, so a real bucket boundary cannot fall inside the test
        stores = [RedisStore(server.url, prefix=prefix, timeout_s=5.0, clock=clock) for _ in range(2)]
        d = demand("shared", limit=50, window=60.0)
        try:
            results = await asyncio.gather(*(stores[i % 2].admit([d]) for i in range(200)))
            return sum(r.admitted for r in results), await stores[0].usage("shared", "acme", 60.0, "sliding")
        finally:
            for store in stores:
                await store.close()

    admitted, used = asyncio.run(scenario())
    assert admitted == 50
    assert used == 50


# --- failures and recovery ---------------------------------------------------------------------


def test_server_down_reports_unavailable_and_recovers(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> None:
        clock = FakeClock(T0 + 30.0)
        # A refused connection fails at once whatever the timeout; 0.5 s only spares a loaded
        # machine a spurious timeout while reconnecting and reloading the script after restart.
        store = RedisStore(server.url, prefix=prefix, timeout_s=0.5, clock=clock)
        try:
            first = await asyncio.wait_for(store.admit([demand()]), FAILURE_BOUND_S)
            assert first.admitted
            server.stop()
            for call in (
                lambda: store.admit([demand()]),
                lambda: store.charge("c", "acme", 60.0, "sliding", 1),
                lambda: store.usage("c", "acme", 60.0, "sliding"),
            ):
                with pytest.raises(StoreUnavailable) as failure:
                    await asyncio.wait_for(call(), FAILURE_BOUND_S)
                assert failure.value.__cause__ is not None
            server.restart()  # same port, empty data set, empty script cache
            again = await asyncio.wait_for(store.admit([demand()]), FAILURE_BOUND_S)
            assert again.admitted and again.states[0].used == 0
            assert await store.usage("c", "acme", 60.0, "sliding") == 1
        finally:
            if server.pid is None:
                server.start()
            await store.close()

    asyncio.run(scenario())


def test_script_cache_flush_is_survived(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=FakeClock())
        inspect = Redis.from_url(server.url)
        try:
            assert (await store.admit([demand()])).admitted
            await inspect.script_flush()
            result = await store.admit([demand()])  # NOSCRIPT -> load -> run, invisibly
            assert result.admitted and result.states[0].used == 1
        finally:
            await inspect.aclose()
            await store.close()

    asyncio.run(scenario())


def test_server_errors_report_unavailable(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> None:
        clock = FakeClock(T0)
        store = RedisStore(server.url, prefix=prefix, timeout_s=2.0, clock=clock)
        inspect = Redis.from_url(server.url)
        try:
            # A foreign value in a bucket key makes the script fail on the server.
            await inspect.set(f"{prefix}{{acme}}:c:{int(T0 // 60)}", "not a number")
            with pytest.raises(StoreUnavailable):
                await store.admit([demand()])
        finally:
            await inspect.aclose()
            await store.close()

    asyncio.run(scenario())


def test_a_stalled_server_times_out_and_recovers(server: RedisProcess, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(server.url, prefix=prefix, timeout_s=0.25, clock=FakeClock())
        inspect = Redis.from_url(server.url)
        try:
            await store.usage("c", "acme", 60.0, "sliding")  # connected and script loaded
            await inspect.client_pause(1000, all=True)
            with pytest.raises(StoreUnavailable) as failure:
                await asyncio.wait_for(store.usage("c", "acme", 60.0, "sliding"), FAILURE_BOUND_S)
            assert "no reply within" in str(failure.value)
            await inspect.client_unpause()  # paused itself: returns once the pause is over
            assert await asyncio.wait_for(store.usage("c", "acme", 60.0, "sliding"), FAILURE_BOUND_S) == 0
        finally:
            await inspect.aclose()
            await store.close()

    asyncio.run(scenario())
