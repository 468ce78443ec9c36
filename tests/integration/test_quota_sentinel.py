"""RedisStore on the primary that Sentinel names (redis+sentinel:// URLs), against real
processes: a primary, a replica and three sentinels (valkey-server in sentinel mode) on loopback.
Parity with MemoryStore, a failover after the primary stops, a failover ordered while the old
primary lives on (it then refuses writes: READONLY), and what a wrong URL gets."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from policy_engine.canary.state import RolloutState
from policy_engine.canary.store import RedisStore as RolloutRedisStore
from policy_engine.quota.redis_store import RedisStore
from policy_engine.quota.sentinel import MIN_ASK_INTERVAL_S
from policy_engine.quota.store import Demand, StoreUnavailable
from tests.integration.test_quota_redis import ALL_SCENARIOS, T0, FakeClock, assert_agrees_with_memory
from tests.redis_server import (
    RedisProcess,
    SentinelGroup,
    command,
    find_server_binary,
    free_port,
    start_sentinel_group,
)

FAILOVER_BOUND_S = 30.0  # the sentinels' own failover (1 s down-after, election), not ours


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    started = start_sentinel_group()
    yield started
    started.close()


@pytest.fixture
def own_group() -> Iterator[SentinelGroup]:
    """A group of the test's own, for tests that fail its primary over."""
    started = start_sentinel_group(group=f"g{uuid.uuid4().hex[:6]}")
    yield started
    started.close()


@pytest.fixture
def prefix() -> str:
    return f"pe-test-{uuid.uuid4().hex[:12]}:"


def still() -> FakeClock:
    return FakeClock(T0 + 13.7)


def one(tag: str = "acme") -> Demand:
    return Demand("c", tag, 100, 60.0, "sliding", 1, False)


@pytest.mark.parametrize("name", list(ALL_SCENARIOS)[:6])
def test_a_sentinel_store_and_the_memory_store_agree(group: SentinelGroup, prefix: str, name: str) -> None:
    assert_agrees_with_memory(
        lambda clock: RedisStore(group.url, prefix=prefix, timeout_s=2.0, clock=clock), name
    )


def test_counters_are_written_to_the_primary(group: SentinelGroup, prefix: str) -> None:
    async def scenario() -> list[int]:
        store = RedisStore(group.url, prefix=prefix, timeout_s=2.0, clock=still())
        try:
            return [(await store.admit([one()])).states[0].used for _ in range(3)]
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [0, 1, 2]
    assert command(group.primary.port, "KEYS", f"{prefix}*") != []


def _wait_for_replicas(group: SentinelGroup, primary_port: int) -> None:
    assert command(primary_port, "WAIT", str(len(group.replicas)), "10000") == len(group.replicas)


def test_a_stopped_primary_is_replaced_and_counting_resumes(own_group: SentinelGroup, prefix: str) -> None:
    """The primary stops; calls fail (on_error decides meanwhile) until the sentinels promote
    the replica, and the store finds it by asking them again."""

    async def scenario() -> tuple[int, list[str]]:
        store = RedisStore(own_group.url, prefix=prefix, timeout_s=0.5, clock=still())
        try:
            for _ in range(3):
                await store.admit([one()])
            _wait_for_replicas(own_group, own_group.primary.port)
            own_group.primary.stop()
            failures: list[str] = []
            deadline = time.monotonic() + FAILOVER_BOUND_S
            while True:
                try:
                    admission = await store.admit([one()])
                    break
                except StoreUnavailable as error:
                    failures.append(str(error))
                    assert time.monotonic() < deadline, f"no failover: {failures[-3:]}"
                    await asyncio.sleep(0.1)
            return admission.states[0].used, failures
        finally:
            await store.close()

    used, failures = asyncio.run(scenario())
    assert failures, "calls to the stopped primary should have failed until the failover"
    # (Sentinels learn of the failover one after the other: ask the node, not the first one.)
    assert command(own_group.replicas[0].port, "ROLE")[0] == "master"  # type: ignore[index]
    assert used == 3  # the replica had the three counts


def test_a_demoted_primary_is_left_without_a_failed_call(own_group: SentinelGroup, prefix: str) -> None:
    """A failover ordered while the old primary runs on (maintenance): it becomes a replica and
    refuses the next write (READONLY, nothing written), which goes to the new primary at once."""

    async def scenario() -> tuple[int, int]:
        store = RedisStore(own_group.url, prefix=prefix, timeout_s=2.0, clock=still())
        try:
            for _ in range(3):
                await store.admit([one()])
            _wait_for_replicas(own_group, own_group.primary.port)
            command(own_group.sentinels[0].port, "SENTINEL", "FAILOVER", own_group.group)
            deadline = time.monotonic() + FAILOVER_BOUND_S
            while command(own_group.primary.port, "ROLE")[0] != "slave":  # type: ignore[index]
                assert time.monotonic() < deadline, "the old primary was never demoted"
                await asyncio.sleep(0.05)
            while own_group.primary_port() != own_group.replicas[0].port:
                assert time.monotonic() < deadline, "the sentinels never named the new primary"
                await asyncio.sleep(0.05)
            # Many at once, all on the old connection: each gets its own READONLY and goes again.
            admissions = await asyncio.gather(*(store.admit([one()]) for _ in range(20)))
            keys_on_new = len(command(own_group.replicas[0].port, "KEYS", f"{prefix}*"))  # type: ignore[arg-type]
            return sorted(a.states[0].used for a in admissions), keys_on_new
        finally:
            await store.close()

    used, keys_on_new = asyncio.run(scenario())
    assert used == list(range(3, 23)) and keys_on_new == 1


def test_a_late_reply_fails_its_call_alone(group: SentinelGroup, prefix: str) -> None:
    """A reply later than the timeout fails that call; the connection to the primary stays,
    and the sentinels are not asked again."""

    async def scenario() -> tuple[float, float, int]:
        store = RedisStore(group.url, prefix=prefix, timeout_s=0.2, clock=still())
        try:
            await store.admit([one()])
            found_at = store._redis._search._ended_at  # type: ignore[attr-defined]
            command(group.primary.port, "CLIENT", "PAUSE", "600", "WRITE")
            with pytest.raises(StoreUnavailable, match="no reply within"):
                await store.admit([one()])
            await asyncio.sleep(0.6)
            used = (await store.admit([one()])).states[0].used
            return found_at, store._redis._search._ended_at, used  # type: ignore[attr-defined]
        finally:
            await store.close()

    before, after, used = asyncio.run(scenario())
    assert before == after
    assert used == 2  # the late call was counted when the server took it: it may have run


def refusal(url: str, prefix: str) -> str:
    """What an admission through `url` fails with (it must fail)."""

    async def scenario() -> str:
        store = RedisStore(url, prefix=prefix, timeout_s=2.0, clock=still())
        try:
            with pytest.raises(StoreUnavailable) as failed:
                await store.admit([one()])
            return str(failed.value)
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_a_group_the_sentinels_do_not_know_is_named_in_the_error(group: SentinelGroup, prefix: str) -> None:
    url = group.url.replace(f"/{group.group}/", "/no-such-group/")
    assert "knows no group named 'no-such-group'" in refusal(url, prefix)


def test_a_node_named_by_a_sentinel_that_is_no_primary_is_not_used(group: SentinelGroup, prefix: str) -> None:
    """A sentinel that names a replica (one not yet told of a failover; here one configured to
    watch the replica): the store checks the node's role and does not send it the scripts."""
    replica = group.replicas[0]
    config = (
        f"sentinel monitor stale 127.0.0.1 {replica.port} 1\nsentinel down-after-milliseconds stale 60000\n"
    )
    sentinel = RedisProcess(find_server_binary(), free_port(), sentinel_config=config)
    sentinel.start()
    try:
        message = refusal(f"redis+sentinel://127.0.0.1:{sentinel.port}/stale/0", prefix)
    finally:
        sentinel.close()
    assert f"names 127.0.0.1:{replica.port}, which is not a primary" in message


def test_unreachable_sentinels_fail_calls_at_once_for_a_moment(prefix: str) -> None:
    """No sentinel answers: the first call fails after asking each, and the calls right after it
    fail at once with that error; after the interval the sentinels are asked again."""
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/g/0"

    async def scenario() -> tuple[list[str], list[float]]:
        store = RedisStore(url, prefix=prefix, timeout_s=0.5, clock=still())
        errors: list[str] = []
        asked_at: list[float] = []
        try:
            for pause in (0.0, 0.0, MIN_ASK_INTERVAL_S + 0.05):
                await asyncio.sleep(pause)
                with pytest.raises(StoreUnavailable) as failed:
                    await store.admit([one()])
                errors.append(str(failed.value))
                asked_at.append(store._redis._search._ended_at)  # type: ignore[attr-defined]
            return errors, asked_at
        finally:
            await store.close()

    errors, asked_at = asyncio.run(scenario())
    assert all("no primary of 'g' found" in e and "Connect call failed" in e for e in errors), errors
    assert asked_at[0] == asked_at[1] < asked_at[2]  # the second call did not ask again


def test_the_rollout_store_works_through_sentinel(group: SentinelGroup, prefix: str) -> None:
    async def scenario() -> None:
        store = RolloutRedisStore(group.url, prefix=f"{prefix}canary:")
        try:
            state = RolloutState("p", "rev", "progressing", 0, 10, T0, T0)
            await store.save(state)
            assert await store.load("p") == state
            assert await store.lease("a", 5.0) and not await store.lease("b", 5.0)
        finally:
            await store.close()

    asyncio.run(scenario())
    assert command(group.primary.port, "KEYS", f"{prefix}canary:*") == [f"{prefix}canary:p"]
