"""Warnings repeated on every request come at most once per interval, saying how many they stand for."""

from __future__ import annotations

import logging

import pytest

from policy_engine.log_throttle import LogThrottle


def test_a_repeated_warning_is_logged_once_per_interval_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("test.throttle"), every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for second in range(25):
            now[0] = 100.0 + second
            throttle.warning("store", "store down: %s", f"error {second}")
            throttle.warning("policy/rule", "rule failed")
    store = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store down")]
    assert store == [
        "store down: error 0",
        "store down: error 10 (and 9 more like it in the last 10 s)",
        "store down: error 20 (and 9 more like it in the last 10 s)",
    ]
    assert sum(r.getMessage().startswith("rule failed") for r in caplog.records) == 3


def test_the_kind_evicted_is_the_one_least_recently_logged(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("test.evict"), every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.evict"):
        throttle.warning("admit", "admit failed")
        for index in range(1023):
            throttle.warning(f"kind {index}", "other")
        now[0] = 20.0
        throttle.warning("admit", "admit failed")  # logged again: now the most recent kind
        now[0] = 21.0
        throttle.warning("one more", "other")  # over 1,024 kinds: the least recent goes
        now[0] = 22.0
        throttle.warning("admit", "admit failed")  # within 10 s of the last: left out
    assert sum(r.getMessage() == "admit failed" for r in caplog.records) == 2
