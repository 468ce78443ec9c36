"""Rollout stores: the JSON file (atomic, survives a restart) and Redis (a real valkey server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy_engine.canary.machine import Reading, RolloutSpec, start
from policy_engine.canary.state import Counts, RolloutState
from policy_engine.canary.store import FileStore, RedisStore, RolloutStore, StoreError
from tests.redis_server import RedisProcess, start_redis

SPEC = RolloutSpec((5, 50, 100), 2.0, 5, 3, "hold")


def a_state(policy: str = "c") -> RolloutState:
    return start(policy, "rev", SPEC, Reading("s", Counts(1, 0, 2, 0)), 1000.0).state


async def exercise(store: RolloutStore) -> None:
    assert await store.load("c") is None and await store.take_command("c") is None
    state = a_state()
    await store.save(state)
    await store.save(a_state("d"))
    assert await store.load("c") == state
    assert set(await store.load_many(["c", "d", "missing"])) == {"c", "d"}
    assert set(await store.load_all()) == {"c", "d"}
    await store.request("c", "abort")
    assert await store.take_command("c") == "abort"
    assert await store.take_command("c") is None  # taken once
    assert await store.load("c") == state  # a command leaves the state alone


def test_file_store(tmp_path: Path) -> None:
    asyncio.run(exercise(FileStore(tmp_path / "sub" / "state.json")))


def test_file_store_survives_a_new_process_view(tmp_path: Path) -> None:
    """A second store on the same file (as after a restart) reads the very same rollout."""
    path = tmp_path / "state.json"
    state = a_state()
    asyncio.run(FileStore(path).save(state))
    assert asyncio.run(FileStore(path).load("c")) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]  # no temporary


def test_file_store_reports_a_corrupt_file_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        asyncio.run(FileStore(path).load("c"))
    with pytest.raises(StoreError):
        asyncio.run(FileStore(path).save(a_state()))
    assert path.read_text() == "{not json"  # nothing lost


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    process = start_redis()
    yield process
    process.close()


def test_redis_store(redis_server: RedisProcess) -> None:
    async def run() -> None:
        store = RedisStore(redis_server.url, prefix=f"pe-test-{uuid.uuid4().hex[:8]}:")
        try:
            await exercise(store)
        finally:
            await store.close()

    asyncio.run(run())


def test_redis_store_unavailable_is_a_clear_error() -> None:
    from tests.redis_server import free_port

    async def run() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        try:
            with pytest.raises(StoreError, match="HGET failed"):
                await store.load("c")
        finally:
            await store.close()

    asyncio.run(run())


def test_replicas_sharing_redis_elect_one_controller(redis_server: RedisProcess) -> None:
    async def run() -> None:
        prefix = f"pe-test-{uuid.uuid4().hex[:8]}:"
        first, second = (
            RedisStore(redis_server.url, prefix=prefix),
            RedisStore(redis_server.url, prefix=prefix),
        )
        try:
            assert await first.lease("pod-a", ttl_s=0.3) is True
            assert await second.lease("pod-b", ttl_s=0.3) is False
            assert await first.lease("pod-a", ttl_s=0.3) is True  # renewed by its holder
            assert await first.load_all() == {}  # the lease is not a rollout
            deadline = time.monotonic() + 10
            while not await second.lease("pod-b", ttl_s=5):  # pod-a stopped renewing
                assert time.monotonic() < deadline, "the lease never expired"
                await asyncio.sleep(0.1)
            assert await first.lease("pod-a", ttl_s=5) is False
        finally:
            await first.close()
            await second.close()

    asyncio.run(run())
