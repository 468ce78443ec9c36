"""Finding where commands go (a cluster's slot map, the primary Sentinel names), once for every
caller waiting on it.

One search runs at a time and its waiters share it; a caller that gives up does not end it.
After a failed search, callers fail at once with its error until `min_interval_s` has passed
since it ended, instead of each trying every node again; a failure is logged once per outage,
and the recovery once. The search is made again on a new event loop (tests, embedding), where
one left on the old loop could never finish. Closing cancels a search under way; its waiters
then fail as RedisUnreachable (nothing was sent), not as cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from policy_engine.quota.resp import RedisUnreachable

log = logging.getLogger("policy_engine.quota")

T = TypeVar("T")


class Discovery(Generic[T]):
    def __init__(
        self,
        search: Callable[[], Coroutine[Any, Any, T]],
        *,
        name: str,
        doing: str,
        min_interval_s: float,
        found: Callable[[T], None] = lambda _: None,
        discard: Callable[[T], None] = lambda _: None,
    ) -> None:
        """`search` finds; `found` takes each successful result as its search ends, before any
        waiter resumes; `discard` takes the result of a search that ended after close or was
        left behind on another event loop (a result holding a connection is its to close).
        `name` prefixes the log lines ("redis cluster"); `doing` says what a search does, for
        messages ("reading the slot map")."""
        self._search = search
        self._found = found
        self._discard = discard
        self._name = name
        self._doing = doing
        self._min_interval_s = min_interval_s
        self._task: asyncio.Task[T] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended_at = float("-inf")
        self._error: str | None = None  # why the last search failed
        self._closed = False

    async def result(self) -> T:
        """The running search's result, or a new search's; at once the last failure's error
        while it is recent."""
        task = self._running()
        if task is None:
            if self._error is not None and self._recent():
                raise RedisUnreachable(self._error)
            task = self.start()
        try:
            # Shielded: a caller that gives up does not end the search the others wait on.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and caller is not None and not caller.cancelling():
                raise RedisUnreachable(f"the connection was closed while {self._doing}") from None
            raise

    def start(self) -> asyncio.Task[T]:
        """The search under way, or a new one."""
        if self._closed:
            raise RedisUnreachable("the connection was closed")
        task = self._running()
        if task is None:
            task = self._task = asyncio.get_running_loop().create_task(self._search())
            task.add_done_callback(self._ended)
        return task

    def start_soon(self) -> None:
        """A search in the background, unless closed or one ended a moment ago."""
        if not self._closed and not self._recent():
            self.start()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._running(), None
        if task is not None and not task.done():
            task.cancel()
            # Its outcome is of no interest now; a cancellation of this caller propagates.
            await asyncio.gather(task, return_exceptions=True)

    def _running(self) -> asyncio.Task[T] | None:
        """The current search, until its end is handled (`_ended` clears it): a caller coming
        between its last step and that must wait for it, not start another."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._task = loop, None
        return self._task

    def _recent(self) -> bool:
        return asyncio.get_running_loop().time() - self._ended_at < self._min_interval_s

    def _ended(self, task: asyncio.Task[T]) -> None:
        current = task is self._task
        if current:
            self._task = None
            self._ended_at = asyncio.get_running_loop().time()
        if task.cancelled():  # closed: nothing was learnt
            return
        # Retrieving the error also keeps asyncio from reporting it when no caller waited.
        error = task.exception()
        if not current or self._closed:
            if error is None:
                self._discard(task.result())
            return
        if error is not None:
            if self._error is None:  # once per outage, not per search
                log.warning("%s: %s", self._name, error)
            self._error = str(error)
            return
        if self._error is not None:
            log.info("%s: %s worked again", self._name, self._doing)
        self._error = None
        self._found(task.result())
