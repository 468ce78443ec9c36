"""start_eagerly: a coroutine runs at once up to its first suspension, then as a Task would."""

from __future__ import annotations

import asyncio

import pytest

from policy_engine.envoy.eager import start_eagerly


def test_a_coroutine_that_never_waits_is_done_before_the_loop_turns() -> None:
    async def scenario() -> None:
        steps: list[str] = []

        async def decide() -> int:
            steps.append("ran")
            return 7

        asyncio.get_running_loop().call_soon(steps.append, "loop turned")
        future = start_eagerly(decide())
        assert future.done() and future.result() == 7
        assert steps == ["ran"]  # the queued callback has not run yet
        await asyncio.sleep(0)
        assert steps == ["ran", "loop turned"]

    asyncio.run(scenario())


def test_a_failure_before_any_wait_is_in_the_future() -> None:
    async def scenario() -> None:
        async def decide() -> int:
            raise ValueError("bad")

        future = start_eagerly(decide())
        assert future.done()
        with pytest.raises(ValueError, match="bad"):
            future.result()

    asyncio.run(scenario())


def test_a_coroutine_that_waits_carries_on_as_a_task() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store: asyncio.Future[int] = loop.create_future()
        steps: list[str] = []

        async def decide() -> int:
            steps.append("before")
            value = await store  # a store round trip
            steps.append(f"got {value}")
            await asyncio.sleep(0)  # a bare yield to the loop, as a Task allows
            failed: asyncio.Future[int] = loop.create_future()
            loop.call_soon(failed.set_exception, KeyError("gone"))
            try:
                await failed
            except KeyError:
                steps.append("caught")
            return value + 1

        future = start_eagerly(decide())
        assert steps == ["before"] and not future.done()
        loop.call_later(0.01, store.set_result, 41)
        assert await asyncio.wait_for(future, 5) == 42
        assert steps == ["before", "got 41", "caught"]

    asyncio.run(scenario())


def test_cancelling_the_task_reaches_the_coroutine_where_it_waits() -> None:
    async def scenario() -> None:
        cleaned: list[bool] = []

        async def decide() -> int:
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.append(True)
            return 0

        future = start_eagerly(decide())
        await asyncio.sleep(0)
        future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await future
        assert cleaned == [True]

    asyncio.run(scenario())
