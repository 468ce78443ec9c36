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
