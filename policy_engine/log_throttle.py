"""Warnings that repeat on every request (a store outage, a policy failing at run time) at most
once per interval per kind, each line saying how many it stands for: an outage at thousands of
requests per second must not bury the log, nor hide that it is still going on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Kind:
    last: float
    left_out: int = 0


@dataclass
class LogThrottle:
    logger: logging.Logger
    every_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _kinds: dict[str, _Kind] = field(default_factory=dict)

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Logs `message % args` unless a line of this kind was logged within `every_s`."""
        now = self.clock()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen.last < self.every_s:
            seen.left_out += 1
            return
        left_out = seen.left_out if seen is not None else 0
        self._kinds.pop(kind, None)  # re-inserted last: the oldest kind is the one evicted
        self._kinds[kind] = _Kind(now)
        if len(self._kinds) > 1024:  # kinds named after data (a counter, a policy): bounded
            del self._kinds[next(iter(self._kinds))]
        if left_out:
            message += f" (and {left_out} more like it in the last %.0f s)"
            args = (*args, now - seen.last if seen is not None else 0.0)
        self.logger.warning(message, *args)
