"""RedisStore on a real Redis Cluster (valkey-server processes in cluster mode on loopback):
parity with MemoryStore, keys on the nodes that own their slots, and the cluster changing under
traffic (a slot moved, a slot being migrated, a primary failing over to its replica)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from policy_engine.canary.state import RolloutState
from policy_engine.canary.store import RedisStore as RolloutRedisStore
from policy_engine.quota.cluster import MIN_REFRESH_INTERVAL_S, RespCluster, key_slot
from policy_engine.quota.redis_store import RedisStore, _key_tag
from policy_engine.quota.resp import RedisLost, RespConnection
from policy_engine.quota.store import Demand, StoreUnavailable
from tests.integration.test_quota_redis import ALL_SCENARIOS, T0, FakeClock, assert_agrees_with_memory
from tests.redis_server import RedisClusterNodes, RedisProcess, command, start_cluster

FAILOVER_BOUND_S = 30.0  # the cluster's own failover (node timeout 1 s, election), not ours


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = start_cluster(primaries=3)
    yield nodes
    nodes.close()


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterNodes]:
    """A cluster of the test's own, for tests that move slots or stop nodes (three primaries:
    a failover needs the votes of a majority of them)."""
    nodes = start_cluster(primaries=3, replicas=1)
    yield nodes
    nodes.close()


@pytest.fixture
def prefix() -> str:
    return f"pe-test-{uuid.uuid4().hex[:12]}:"


def still() -> FakeClock:
    """A clock that stands still: counts in a sliding window must not depend on when the test
    runs (a minute boundary would weigh the earlier bucket down)."""
    return FakeClock(T0 + 13.7)


def one(tag: str, *, limit: int = 100, cost: int = 1) -> Demand:
    return Demand("c", tag, limit, 60.0, "sliding", cost, False)


def tag_slot(tag: str) -> int:
    return key_slot("{" + _key_tag(tag) + "}")


def owner(cluster: RedisClusterNodes, slot: int) -> RedisProcess:
    for node in cluster.nodes:
        for entry in command(node.port, "CLUSTER", "SLOTS"):  # type: ignore[attr-defined]
            if entry[0] <= slot <= entry[1]:
                port = entry[2][1]
                return next(n for n in cluster.nodes if n.port == port)
    raise AssertionError(f"no node owns slot {slot}")


def node_id(node: RedisProcess) -> str:
    return str(command(node.port, "CLUSTER", "MYID"))


def keys_of(node: RedisProcess, prefix: str) -> list[str]:
    return [str(k) for k in command(node.port, "KEYS", f"{prefix}*")]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(ALL_SCENARIOS))
def test_a_cluster_store_and_the_memory_store_agree(
    cluster: RedisClusterNodes, prefix: str, name: str
) -> None:
    assert_agrees_with_memory(
        lambda clock: RedisStore(cluster.url, prefix=prefix, timeout_s=2.0, cluster=True, clock=clock), name
    )


def test_each_counter_lives_on_the_node_that_owns_its_slot(cluster: RedisClusterNodes, prefix: str) -> None:
    tags = [f"tenant-{i}" for i in range(24)]

    async def scenario() -> None:
        # Through a node that owns few of the tags: most calls start with a MOVED.
        store = RedisStore(
            cluster.primaries[2].url, prefix=prefix, timeout_s=2.0, cluster=True, clock=still()
        )
        try:
            for tag in tags:
                assert (await store.admit([one(tag)])).admitted
            # One request's counters on several nodes: a script per tag, each on its own node.
            admission = await store.admit([one(tag) for tag in tags[:6]])
            assert admission.admitted and [s.used for s in admission.states] == [1] * 6
        finally:
            await store.close()

    asyncio.run(scenario())
    holders = {node.port: keys_of(node, prefix) for node in cluster.primaries}
    assert all(holders.values()), f"every primary should hold some of 24 tags: {holders}"
    for tag in tags:
        expected = owner(cluster, tag_slot(tag)).port
        found = [port for port, keys in holders.items() if any(f"{{{tag}}}" in k for k in keys)]
        assert found == [expected], tag


def test_a_replica_as_the_url_finds_the_primaries(own_cluster: RedisClusterNodes, prefix: str) -> None:
    async def scenario() -> list[int]:
        store = RedisStore(
            own_cluster.replicas[0].url, prefix=prefix, timeout_s=2.0, cluster=True, clock=still()
        )
        try:
            return [(await store.admit([one(f"t{i}")])).states[0].used for i in range(8)]
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [0] * 8  # the usage each admission found


def test_a_moved_slot_keeps_its_counts_and_no_call_fails(own_cluster: RedisClusterNodes, prefix: str) -> None:
    """A slot resharded to another primary between calls: the next call is redirected (MOVED),
    and counting goes on from the moved counters."""
    tag = "moving-tenant"
    slot = tag_slot(tag)

    async def scenario() -> list[int]:
        store = RedisStore(own_cluster.url, prefix=prefix, timeout_s=2.0, cluster=True, clock=still())
        try:
            used = [(await store.admit([one(tag)])).states[0].used for _ in range(3)]
            source = owner(own_cluster, slot)
            target = next(n for n in own_cluster.primaries if n is not source)
            move_slot(own_cluster, slot, source, target)
            used += [(await store.admit([one(tag)])).states[0].used for _ in range(3)]
            assert keys_of(source, prefix) == [] and keys_of(target, prefix) != []
            return used
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4, 5]  # the usage each admission found


def test_a_key_not_yet_migrated_is_asked_of_the_importing_node(own_cluster: RedisClusterNodes) -> None:
    """While a slot migrates, a key the old node no longer has is served by the new one: ASK,
    then the command preceded by ASKING on the same connection."""
    key = f"arriving-{uuid.uuid4().hex[:8]}"
    slot = key_slot(key)
    source = owner(own_cluster, slot)
    target = next(n for n in own_cluster.primaries if n is not source)
    start_move(slot, source, target)

    # Keys of the target's own slots, written at the same time over the same connection: none
    # may come between an ASKING and its command.
    others = [k for k in (f"other-{i}" for i in range(2000)) if owner(own_cluster, key_slot(k)) is target][
        :40
    ]
    arriving = [f"{{{key}}}:{i}" for i in range(40)]

    async def scenario() -> list[object]:
        client = RespCluster(source.url, timeout_s=2.0)
        try:
            await client.call("GET", others[0], key=others[0])  # the map, and the target's connection
            calls = [
                client.call("SET", k, "1", key=k) for pair in zip(arriving, others, strict=True) for k in pair
            ]
            return list(await asyncio.gather(*calls))
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [b"OK"] * 80
    assert command(source.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 0
    assert command(target.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 40


def test_counters_split_by_a_migration_fail_cleanly_until_it_ends(
    own_cluster: RedisClusterNodes, prefix: str
) -> None:
    """A script whose keys a migration has split cannot run (TRYAGAIN): the call is tried
    again a few times, then fails without charging; once the migration ends it counts on."""
    tag = "split-tenant"
    slot = tag_slot(tag)
    source = owner(own_cluster, slot)
    target = next(n for n in own_cluster.primaries if n is not source)

    async def scenario() -> tuple[str, int]:
        store = RedisStore(own_cluster.url, prefix=prefix, timeout_s=2.0, cluster=True, clock=still())
        try:
            assert (await store.admit([one(tag)])).admitted  # the current bucket only
            start_move(slot, source, target)
            with pytest.raises(StoreUnavailable) as failed:
                await store.admit([one(tag)])
            # A counter the old node never had is split the same way: it is sent to the new node
            # (ASK), which cannot run a script over keys it has only part of either.
            with pytest.raises(StoreUnavailable) as fresh:
                await store.admit([Demand("fresh", tag, 100, 60.0, "sliding", 1, False)])
            assert "TRYAGAIN" in str(fresh.value)
            finish_move(own_cluster, slot, source, target)
            return str(failed.value), (await store.admit([one(tag)])).states[0].used
        finally:
            await store.close()

    message, used = asyncio.run(scenario())
    assert "TRYAGAIN" in message
    assert used == 1  # the failed calls charged nothing


def test_a_failed_primary_is_replaced_and_counting_resumes(
    own_cluster: RedisClusterNodes, prefix: str
) -> None:
    """The primary of a tag stops; calls fail (the configured on_error decides meanwhile) until
    the cluster promotes its replica, then the store finds the new primary by itself."""
    primary = own_cluster.primaries[0]
    tag = next(f"t{i}" for i in range(1000) if owner(own_cluster, tag_slot(f"t{i}")) is primary)

    async def scenario() -> tuple[int, int, list[str]]:
        store = RedisStore(own_cluster.url, prefix=prefix, timeout_s=0.5, cluster=True, clock=still())
        try:
            for _ in range(3):
                await store.admit([one(tag)])
            # Replication is asynchronous: wait until the replica has had every write.
            assert command(primary.port, "WAIT", "1", "10000") == 1
            primary.stop()
            failures: list[str] = []
            deadline = time.monotonic() + FAILOVER_BOUND_S
            while True:
                try:
                    admission = await store.admit([one(tag)])
                    break
                except StoreUnavailable as error:
                    failures.append(str(error))
                    assert time.monotonic() < deadline, (
                        f"no failover within {FAILOVER_BOUND_S} s: {failures[-3:]}"
                    )
                    await asyncio.sleep(0.1)
            return admission.states[0].used, owner_port(own_cluster, tag), failures
        finally:
            await store.close()

    used, port, failures = asyncio.run(scenario())
    assert failures, "the stopped primary's calls should have failed until the failover"
    assert port == own_cluster.replicas[0].port
    assert used == 3  # the replica had the three counts


def owner_port(cluster: RedisClusterNodes, tag: str) -> int:
    for node in cluster.nodes:
        if node.pid is None:
            continue
        entries = command(node.port, "CLUSTER", "SLOTS")
        for entry in entries:  # type: ignore[attr-defined]
            if entry[0] <= tag_slot(tag) <= entry[1]:
                return int(entry[2][1])
    raise AssertionError("no live node knows the slot")


def test_a_cluster_node_without_the_cluster_setting_is_named_in_the_error(
    cluster: RedisClusterNodes, prefix: str
) -> None:
    tag = next(f"t{i}" for i in range(1000) if owner(cluster, tag_slot(f"t{i}")) is not cluster.primaries[0])

    async def scenario() -> str:
        store = RedisStore(cluster.url, prefix=prefix, timeout_s=2.0, clock=still())
        try:
            with pytest.raises(StoreUnavailable) as failed:
                await store.admit([one(tag)])
            return str(failed.value)
        finally:
            await store.close()

    message = asyncio.run(scenario())
    assert "MOVED" in message and "--redis-cluster" in message


class SilentNode:
    """A TCP server that takes connections and commands and never answers (a hung node), and
    counts the CLUSTER SLOTS commands it was sent."""

    def __init__(self) -> None:
        self.readings = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while chunk := await reader.read(4096):
            data += chunk
            self.readings = data.count(b"SLOTS")
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def test_a_cluster_that_cannot_be_read_fails_calls_at_once_for_a_moment(prefix: str) -> None:
    """While the slot map cannot be read, a reading is not made again for every call: the calls
    right after a failed reading fail at once with its error, and one after the interval reads
    again."""
    node = SilentNode()

    async def scenario() -> tuple[list[str], list[int]]:
        url = await node.start()
        store = RedisStore(url, prefix=prefix, timeout_s=0.1, cluster=True, clock=still())
        errors: list[str] = []
        readings: list[int] = []
        try:
            for _ in range(3):
                with pytest.raises(StoreUnavailable) as failed:
                    await store.admit([one("t")])
                errors.append(str(failed.value))
                readings.append(node.readings)
            await asyncio.sleep(MIN_REFRESH_INTERVAL_S + 0.05)
            with pytest.raises(StoreUnavailable):
                await store.admit([one("t")])
            readings.append(node.readings)
            return errors, readings
        finally:
            await store.close()
            await node.stop()

    errors, readings = asyncio.run(scenario())
    assert all("cannot read the cluster's slot map" in e and "no reply" in e for e in errors), errors
    assert readings == [1, 1, 1, 2]


def test_calls_waiting_for_the_first_slot_map_fail_cleanly_when_the_store_closes(prefix: str) -> None:
    node = SilentNode()

    async def scenario() -> list[BaseException | object]:
        url = await node.start()
        store = RedisStore(url, prefix=prefix, timeout_s=5.0, cluster=True, clock=still())
        try:
            calls = [asyncio.create_task(store.admit([one(f"t{i}")])) for i in range(3)]
            while node.readings < 1:
                await asyncio.sleep(0.01)
            await store.close()
            return list(await asyncio.gather(*calls, return_exceptions=True))
        finally:
            await node.stop()

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, StoreUnavailable) and "closed" in str(o) for o in outcomes), outcomes


def test_a_call_in_flight_when_the_store_closes_is_reported_as_possibly_run(
    cluster: RedisClusterNodes, prefix: str
) -> None:
    """Closed while its script was sent and unanswered: the call fails as one that may have run
    (RedisLost), which decides whether a refund is counted on; not as one never sent."""
    tag = "in-flight"
    node = owner(cluster, tag_slot(tag))

    async def scenario() -> BaseException:
        store = RedisStore(cluster.url, prefix=prefix, timeout_s=5.0, cluster=True, clock=still())
        await store.admit([one(tag)])  # the map and the connection
        command(node.port, "CLIENT", "PAUSE", "3000", "WRITE")
        try:
            call = asyncio.create_task(store.admit([one(tag)]))
            # Past the interval between readings of the map: its failure would read it again.
            await asyncio.sleep(MIN_REFRESH_INTERVAL_S + 0.1)
            await store.close()
            with pytest.raises(StoreUnavailable) as failed:
                await call
            return failed.value
        finally:
            command(node.port, "CLIENT", "UNPAUSE")

    error = asyncio.run(scenario())
    assert isinstance(error.__cause__, RedisLost), repr(error.__cause__)


def test_a_node_connection_being_made_is_not_idle() -> None:
    """A refresh of the slot map closes idle connections to nodes it no longer lists; one whose
    callers wait for it to connect (here on its AUTH) is not idle."""
    node = SilentNode()

    async def scenario() -> tuple[bool, bool]:
        url = (await node.start()).replace("redis://", "redis://:password@")
        connection = RespConnection(url, timeout_s=5.0)
        before = connection.idle
        call = asyncio.create_task(connection.call("PING"))
        await asyncio.sleep(0.2)
        during = connection.idle
        await connection.close()
        await asyncio.gather(call, return_exceptions=True)
        await node.stop()
        return before, during

    assert asyncio.run(scenario()) == (True, False)


def test_an_unreachable_cluster_recovers_when_it_comes_up(prefix: str) -> None:
    nodes = start_cluster(primaries=1)
    try:
        nodes.primaries[0].stop()

        async def scenario() -> int:
            store = RedisStore(nodes.url, prefix=prefix, timeout_s=0.5, cluster=True, clock=still())
            try:
                with pytest.raises(StoreUnavailable, match="slot map"):
                    await store.admit([one("t")])
                nodes.primaries[0].start()
                deadline = time.monotonic() + 10
                while True:
                    try:
                        return (await store.admit([one("t")])).states[0].used
                    except StoreUnavailable:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
            finally:
                await store.close()

        assert asyncio.run(scenario()) == 0
    finally:
        nodes.close()


def rollout(name: str) -> RolloutState:
    return RolloutState(name, "rev", "progressing", 0, 10, T0, T0)


def test_the_rollout_store_works_on_a_cluster(cluster: RedisClusterNodes, prefix: str) -> None:
    async def scenario() -> None:
        store = RolloutRedisStore(cluster.url, prefix=f"{prefix}canary:", cluster=True)
        try:
            names = [f"policy-{i}" for i in range(12)]  # spread over the primaries
            for name in names:
                await store.save(rollout(name))
            assert sorted((await store.load_all()).keys()) == sorted(names)
            assert (await store.load("policy-3")) == rollout("policy-3")
            await store.request("policy-5", "promote")
            assert await store.take_command("policy-5") == "promote"
            assert await store.take_command("policy-5") is None
            assert await store.lease("a", 5.0) and not await store.lease("b", 5.0)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_stale_slot_map_is_corrected_by_the_redirection(cluster: RedisClusterNodes) -> None:
    """A map naming the wrong node for a slot: that node answers MOVED, the command goes to the
    node named there, and the map keeps it."""
    key = "stale-key"
    slot = key_slot(key)
    real = owner(cluster, slot)
    wrong = next(n for n in cluster.primaries if n is not real)

    async def scenario() -> tuple[object, tuple[str, int] | None]:
        client = RespCluster(cluster.url, timeout_s=2.0)
        try:
            await client.call("GET", key, key=key)  # reads the real map
            assert client._owners is not None
            client._owners[slot] = ("127.0.0.1", wrong.port)
            client._map._ended_at = float("inf")  # no reading of the map would fix it
            reply = await client.call("SET", key, "v", key=key)
            return reply, client._owners[slot]
        finally:
            await client.close()

    reply, kept = asyncio.run(scenario())
    assert reply == b"OK"
    assert kept == ("127.0.0.1", real.port)


def start_move(slot: int, source: RedisProcess, target: RedisProcess) -> None:
    command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(source))
    command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(target))


def finish_move(cluster: RedisClusterNodes, slot: int, source: RedisProcess, target: RedisProcess) -> None:
    """Move the slot's keys, then give the slot to `target` (the order redis-cli follows)."""
    keys = command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000")
    if keys:
        command(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)  # type: ignore[misc]
    new_owner = node_id(target)
    for node in [target, source, *[n for n in cluster.primaries if n not in (source, target)]]:
        command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", new_owner)


def move_slot(cluster: RedisClusterNodes, slot: int, source: RedisProcess, target: RedisProcess) -> None:
    start_move(slot, source, target)
    finish_move(cluster, slot, source, target)
