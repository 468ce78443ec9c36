"""Rolling statistics with time decay: histogram accuracy, percentile movement, decayed rates."""

from __future__ import annotations

import math
import random

import pytest

from policy_engine.telemetry.stats import N_BUCKETS, DecayingHistogram, RollingStats, bucket_index


def feed(
    stats: RollingStats, start: float, seconds: float, rps: float, latency_ms: float, **kw: object
) -> float:
    """Evenly spaced requests from `start`; returns the time after the last one."""
    step = 1.0 / rps
    t = start
    for _ in range(round(seconds * rps)):
        t += step
        stats.record(t, latency_ms=latency_ms, **kw)  # type: ignore[arg-type]
    return t


def test_histogram_quantiles_are_within_a_few_percent() -> None:
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(math.log(80), 0.8) for _ in range(20_000))
    histogram = DecayingHistogram()
    for value in values:
        histogram.add(value, 1.0)
    p50, p90, p99 = histogram.quantiles((0.5, 0.9, 0.99)) or []
    for estimate, q in ((p50, 0.5), (p90, 0.9), (p99, 0.99)):
        exact = values[int(q * len(values))]
        assert estimate == pytest.approx(exact, rel=0.06)


def test_histogram_edges_and_empty() -> None:
    histogram = DecayingHistogram()
    assert histogram.quantiles((0.5,)) is None
    histogram.add(0.0, 1.0)
    histogram.add(float("nan"), 1.0)  # clamped into the first bucket, never an exception
    histogram.add(1e12, 1.0)  # past the range: the last bucket
    assert bucket_index(1e12) == N_BUCKETS - 1
    low, high = histogram.quantiles((0.0, 1.0)) or []
    assert low < 1.0 < 1e5 < high


def test_histogram_range_spreads_uniformly() -> None:
    histogram = DecayingHistogram()
    histogram.add_range(250.0, 500.0, 100.0)  # a scraped bucket (0.25 s, 0.5 s] with 100 requests
    p10, p50, p99 = histogram.quantiles((0.1, 0.5, 0.99)) or []
    assert p10 == pytest.approx(275.0, rel=0.06)
    assert p50 == pytest.approx(375.0, rel=0.06)
    assert 450.0 < p99 < 550.0
    assert histogram.total == pytest.approx(100.0)


def test_p99_rises_within_seconds_of_a_slowdown_and_falls_back_after_recovery() -> None:
    stats = RollingStats(half_life_s=10.0, now=0.0)
    t = feed(stats, 0.0, 60.0, rps=20, latency_ms=50.0)
    before = stats.summary(t)
    assert before.latency_p99_ms == pytest.approx(50.0, rel=0.06)
    assert before.latency_p50_ms == pytest.approx(50.0, rel=0.06)

    t = feed(stats, t, 2.0, rps=20, latency_ms=800.0)  # the backend slows down
    slowed = stats.summary(t)
    assert slowed.latency_p99_ms is not None and slowed.latency_p99_ms > 600.0
    assert slowed.latency_p50_ms == pytest.approx(50.0, rel=0.06)  # the median needs ~a half-life

    t = feed(stats, t, 20.0, rps=20, latency_ms=800.0)
    assert (stats.summary(t).latency_p50_ms or 0) > 600.0

    t = feed(stats, t, 90.0, rps=20, latency_ms=50.0)  # recovered: ~6.6 half-lives to forget a p99
    recovered = stats.summary(t)
    assert recovered.latency_p99_ms == pytest.approx(50.0, rel=0.06)


def test_percentiles_hold_while_idle_and_new_traffic_dominates_after_a_pause() -> None:
    stats = RollingStats(half_life_s=10.0)
    t = feed(stats, 0.0, 10.0, rps=10, latency_ms=100.0)
    assert stats.summary(t + 300.0).latency_p50_ms == pytest.approx(100.0, rel=0.06)
    t = feed(stats, t + 300.0, 1.0, rps=10, latency_ms=30.0)
    assert stats.summary(t).latency_p99_ms == pytest.approx(30.0, rel=0.06)


def test_rates_converge_and_decay_to_zero() -> None:
    stats = RollingStats(half_life_s=10.0)
    t = feed(stats, 0.0, 3.0, rps=50, latency_ms=10.0, tokens=40)
    early = stats.summary(t)
    assert early.rps == pytest.approx(50.0, rel=0.1)  # ramp-up corrected: no slow climb
    assert early.tokens_per_s == pytest.approx(2000.0, rel=0.1)
    t = feed(stats, t, 60.0, rps=50, latency_ms=10.0, tokens=40)
    assert stats.summary(t).rps == pytest.approx(50.0, rel=0.05)
    assert stats.summary(t + 10.0).rps == pytest.approx(25.0, rel=0.05)  # one half-life of silence
    assert stats.summary(t + 600.0).rps < 0.001


def test_error_rate_is_decayed() -> None:
    stats = RollingStats(half_life_s=10.0)
    t = feed(stats, 0.0, 30.0, rps=10, latency_ms=10.0, error=True)
    assert stats.summary(t).error_rate == pytest.approx(1.0)
    t = feed(stats, t, 10.0, rps=10, latency_ms=10.0)  # one half-life of successes
    assert stats.summary(t).error_rate == pytest.approx(0.5, abs=0.05)
    t = feed(stats, t, 60.0, rps=10, latency_ms=10.0)
    assert stats.summary(t).error_rate < 0.02


def test_long_runs_rescale_without_drift_or_overflow() -> None:
    stats = RollingStats(half_life_s=5.0)  # the landmark moves every ~290 s of clock
    t = 0.0
    for _ in range(50):
        t = feed(stats, t, 20.0, rps=5, latency_ms=20.0)
    summary = stats.summary(t)
    assert summary.rps == pytest.approx(5.0, rel=0.05)
    assert summary.latency_p50_ms == pytest.approx(20.0, rel=0.06)
    assert all(math.isfinite(v) for v in (summary.rps, summary.requests, summary.error_rate))


def test_scraped_ttft_wins_over_the_access_log_proxy() -> None:
    stats = RollingStats()
    stats.record(1.0, latency_ms=900.0, ttft_ms=900.0)
    assert stats.summary(1.0).ttft_p99_ms == pytest.approx(900.0, rel=0.1)  # within one bucket
    stats.record_ttft_buckets(2.0, [(100.0, 250.0, 10.0)])
    ttft = stats.summary(2.0).ttft_p99_ms
    assert ttft is not None and 100.0 < ttft < 270.0
