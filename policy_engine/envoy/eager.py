"""Run a coroutine at once, up to its first real suspension (Python 3.12's eager tasks, on 3.11).

A decision with the in-memory counter store never waits for anything, yet wrapped in a Task it
would start on the next turn of the event loop, behind every callback queued meanwhile (an
access-log batch, other connections' reads), and its answer would be written one turn later
still. Started eagerly, a request read in one callback is decided and answered in that same
callback; only a decision that really waits (Redis) becomes a Task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class _Resumed:
    """Awaitable that hands a started coroutine's pending future to the Task driving it, then
    goes on stepping the coroutine exactly as the Task itself would have."""

    def __init__(self, coro: Coroutine[Any, Any, T], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        pending = self._pending
        while True:
            try:
                try:
                    sent = yield pending
                except BaseException as error:  # cancellation reaches the coroutine where it waits
                    pending = self._coro.throw(error)
                else:
                    pending = self._coro.send(sent)
            except StopIteration as done:
                return done.value


async def _finish(coro: Coroutine[Any, Any, T], pending: Any) -> T:
    result: T = await _Resumed(coro, pending)
    return result


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """The coroutine's future: already done when it finished without suspending, else a Task
    that carries on from where it stopped. Call from inside the running event loop."""
    loop = asyncio.get_running_loop()
    try:
        pending = coro.send(None)
    except StopIteration as done:
        future: asyncio.Future[T] = loop.create_future()
        future.set_result(done.value)
        return future
    except Exception as error:
        future = loop.create_future()
        future.set_exception(error)
        return future
    return asyncio.ensure_future(_finish(coro, pending))
