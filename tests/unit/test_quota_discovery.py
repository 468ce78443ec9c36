"""Discovery: one search shared by its waiters, a moment of failing at once after a failure,
results that arrive after close handed to `discard` (the cluster and Sentinel clients' shared
piece; against real servers: tests/integration/test_quota_cluster.py and _sentinel.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from policy_engine.quota.discovery import Discovery
from policy_engine.quota.resp import RedisUnreachable


class Finder:
    def __init__(self, *, fail: bool = False, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay_s = delay_s
        self.found: list[int] = []
        self.discarded: list[int] = []

    async def search(self) -> int:
        self.calls += 1
        number = self.calls
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RedisUnreachable(f"search {number} failed")
        return number

    def discovery(self, min_interval_s: float = 0.25) -> Discovery[int]:
        return Discovery(
            self.search,
            name="test",
            doing="searching",
            min_interval_s=min_interval_s,
            found=self.found.append,
            discard=self.discarded.append,
        )


def test_waiters_share_one_search() -> None:
    finder = Finder(delay_s=0.05)

    async def scenario() -> list[int]:
        discovery = finder.discovery()
        return list(await asyncio.gather(*(discovery.result() for _ in range(5))))

    assert asyncio.run(scenario()) == [1] * 5
    assert finder.calls == 1 and finder.found == [1]


def test_after_a_failure_calls_fail_at_once_until_the_interval_has_passed() -> None:
    finder = Finder(fail=True)

    async def scenario() -> list[str]:
        discovery = finder.discovery(min_interval_s=0.2)
        errors = []
        for pause in (0.0, 0.0, 0.25):
            await asyncio.sleep(pause)
            with pytest.raises(RedisUnreachable) as failed:
                await discovery.result()
            errors.append(str(failed.value))
        return errors

    assert asyncio.run(scenario()) == ["search 1 failed", "search 1 failed", "search 2 failed"]
    assert finder.calls == 2


def test_start_soon_does_not_search_again_a_moment_after_a_search() -> None:
    finder = Finder()

    async def scenario() -> None:
        discovery = finder.discovery(min_interval_s=0.2)
        await discovery.result()
        discovery.start_soon()
        await asyncio.sleep(0.01)
        assert finder.calls == 1
        await asyncio.sleep(0.2)
        discovery.start_soon()
        await asyncio.sleep(0.01)
        assert finder.calls == 2

    asyncio.run(scenario())


def test_closing_ends_the_search_and_its_waiters_fail_as_unreachable() -> None:
    finder = Finder(delay_s=5.0)

    async def scenario() -> list[BaseException | int]:
        discovery = finder.discovery()
        waiters = [asyncio.create_task(discovery.result()) for _ in range(3)]
        await asyncio.sleep(0.01)
        await discovery.close()
        return list(await asyncio.gather(*waiters, return_exceptions=True))

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RedisUnreachable) and "while searching" in str(o) for o in outcomes), outcomes
    assert finder.found == []


def test_a_result_that_arrives_after_close_is_discarded() -> None:
    """A search that finishes although close cancelled it (its result made just then): the
    result goes to `discard`, which closes what it holds, not to `found`."""
    found: list[int] = []
    discarded: list[int] = []

    async def stubborn() -> int:
        with contextlib.suppress(asyncio.CancelledError):  # finishes anyway
            await asyncio.sleep(5)
        return 7

    async def scenario() -> None:
        discovery = Discovery(
            stubborn,
            name="test",
            doing="searching",
            min_interval_s=0.25,
            found=found.append,
            discard=discarded.append,
        )
        discovery.start()
        await asyncio.sleep(0.01)
        await discovery.close()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert (found, discarded) == ([], [7])


def test_a_search_left_on_another_event_loop_is_discarded_there() -> None:
    finder = Finder(delay_s=0.05)
    discovery = finder.discovery()

    async def first() -> None:
        discovery.start()
        await asyncio.sleep(0)  # leave it running

    async def second() -> int:
        return await discovery.result()

    first_loop = asyncio.new_event_loop()
    try:
        first_loop.run_until_complete(first())
        assert asyncio.run(second()) == 2  # a search of its own on the new loop
        first_loop.run_until_complete(asyncio.sleep(0.1))  # the old search ends on its loop
    finally:
        first_loop.close()
    assert finder.found == [2] and finder.discarded == [1]
