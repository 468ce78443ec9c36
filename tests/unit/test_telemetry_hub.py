"""The telemetry hub: staleness, health, snapshot identity, load, scraped data."""

from __future__ import annotations

import math

import pytest

from policy_engine.decide.activation import MessageBuilder
from policy_engine.telemetry.hub import BackendSpec, TelemetryHub
from policy_engine.telemetry.observations import RequestObservation, ScrapeSample


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ok(name: str = "a", latency_ms: float = 50.0, status: int = 200, tokens: int = 0) -> RequestObservation:
    return RequestObservation(name, status, latency_ms=latency_ms, total_tokens=tokens)


def fail(name: str = "a", connect: bool = False) -> RequestObservation:
    if connect:
        return RequestObservation(name, 503, connect_failure=True)
    return RequestObservation(name, 500, latency_ms=5.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_never_heard_from_is_stale_and_fresh_data_ages(clock: FakeClock) -> None:
    hub = TelemetryHub(["a", "b"], clock=clock, stale_after_s=5.0)
    first = hub.snapshot().backends
    assert list(first) == ["a", "b"]
    assert first["a"].stale and first["a"].age_s == math.inf and first["a"].healthy

    assert hub.observe(ok("a"))
    clock.advance(2.0)
    a = hub.snapshot(force=True).backends["a"]
    assert not a.stale and a.age_s == pytest.approx(2.0)
    assert hub.snapshot().backends["b"].stale

    clock.advance(3.5)
    a = hub.snapshot(force=True).backends["a"]
    assert a.stale and a.age_s == pytest.approx(5.5)

    hub.observe_scrape("a", ScrapeSample(running=1, waiting=0))  # a scrape is fresh data too
    assert not hub.snapshot(force=True).backends["a"].stale
    clock.advance(6.0)
    hub.scrape_failed("a", "timed out")  # a failed one is not
    assert hub.snapshot(force=True).backends["a"].stale
    status = hub.status("a")
    assert status is not None and status.last_scrape_error == "timed out" and status.scrape_failures == 1


def test_unknown_backends_are_ignored(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock)
    assert not hub.observe(ok("zzz"))
    assert not hub.observe_scrape("zzz", ScrapeSample())
    assert not hub.scrape_failed("zzz", "x")
    assert hub.unknown_observations == 1
    assert list(hub.snapshot().backends) == ["a"]


def test_consecutive_failures_eject_until_a_success(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock, eject_after=5)
    for _ in range(4):
        hub.observe(fail())
    assert hub.snapshot(force=True).backends["a"].healthy
    hub.observe(ok(status=404))  # a client error is the backend answering: resets the count
    for _ in range(4):
        hub.observe(fail())
    assert hub.snapshot(force=True).backends["a"].healthy
    hub.observe(RequestObservation("a", 0, latency_ms=3000.0))  # no answer at all: neutral
    hub.observe(fail())
    stats = hub.snapshot(force=True).backends["a"]
    assert not stats.healthy and stats.error_rate > 0.5
    hub.observe(ok())
    assert hub.snapshot(force=True).backends["a"].healthy


def test_a_request_nobody_got_an_answer_to_is_slow_but_neither_success_nor_error(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock, eject_after=100)
    for _ in range(4):
        hub.observe(fail())
    before = hub.snapshot(force=True).backends["a"]
    for _ in range(16):  # a hung backend: every client gives up after 30 s
        clock.advance(0.1)
        hub.observe(RequestObservation("a", 0, latency_ms=30_000.0))
    after = hub.snapshot(force=True).backends["a"]
    # The error rate is over answers: not diluted toward 0 by requests nobody answered.
    assert after.error_rate == pytest.approx(before.error_rate) and after.error_rate > 0.9
    # But the backend looks as slow and as busy as it is, and no fresher.
    assert after.latency_p50_ms is not None and after.latency_p50_ms > 10_000.0
    assert after.inflight > before.inflight
    assert after.age_s > before.age_s


def test_ejection_expires_half_open_and_doubles(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock, eject_after=5, ejection_s=10.0, stale_after_s=1000.0)
    for _ in range(5):
        hub.observe(fail())
    assert not hub.snapshot(force=True).backends["a"].healthy
    clock.advance(10.0)
    assert hub.snapshot(force=True).backends["a"].healthy  # half-open: one more chance
    hub.observe(fail())
    assert not hub.snapshot(force=True).backends["a"].healthy  # at once, no 5 more failures
    clock.advance(10.0)
    assert not hub.snapshot(force=True).backends["a"].healthy  # the second ejection lasts 20 s
    clock.advance(10.0)
    assert hub.snapshot(force=True).backends["a"].healthy
    status = hub.status("a")
    assert status is not None and status.ejections == 2 and status.consecutive_failures == 6


def test_a_successful_scrape_ends_only_a_connect_failure_ejection(clock: FakeClock) -> None:
    hub = TelemetryHub(["a", "b"], clock=clock, eject_after=5)
    for _ in range(5):
        hub.observe(fail("a", connect=True))
        hub.observe(fail("b"))
    clock.advance(1.0)
    hub.observe_scrape("a", ScrapeSample(running=0, waiting=0))
    hub.observe_scrape("b", ScrapeSample(running=0, waiting=0))
    backends = hub.snapshot(force=True).backends
    assert backends["a"].healthy  # reachable again
    assert not backends["b"].healthy  # still answers 500 although /metrics works
    hub.observe(fail("a", connect=True))
    assert not hub.snapshot(force=True).backends["a"].healthy  # half-open: the next failure ejects


def test_snapshot_identity_is_cached(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock, refresh_s=0.25)
    first = hub.snapshot()
    assert hub.snapshot() is first
    hub.observe(ok())
    clock.advance(0.1)
    assert hub.snapshot() is first  # within refresh_s: same object even though data changed
    clock.advance(0.2)
    second = hub.snapshot()
    assert second is not first and second.version > first.version
    assert second.backends["a"].rps > 0

    idle = TelemetryHub(["x"], clock=clock)  # nothing ever changes: the same object forever
    snapshot = idle.snapshot()
    for _ in range(5):
        clock.advance(1.0)
        assert idle.snapshot() is snapshot
        assert idle.snapshot(force=True) is snapshot
    assert snapshot.version == 1


def test_snapshot_content_and_load(clock: FakeClock) -> None:
    hub = TelemetryHub(
        [
            BackendSpec(
                "a", version="v2", region="eu", model="m", weight=90, capacity=4, labels={"gpu": "h100"}
            ),
            BackendSpec("b", capacity=4),
            BackendSpec("c"),  # capacity unknown: left out of the load
        ],
        clock=clock,
    )
    assert hub.snapshot().load is None  # nothing usable yet
    hub.observe_scrape("a", ScrapeSample(running=4, waiting=2, kv_cache_usage=0.75))
    hub.observe_scrape("b", ScrapeSample(running=2, waiting=0))
    hub.observe_scrape("c", ScrapeSample(running=7, waiting=7))
    snapshot = hub.snapshot(force=True)
    a = snapshot.backends["a"]
    assert (a.inflight, a.queue_depth, a.kv_cache_usage) == (4, 2, 0.75)
    assert (a.version, a.region, a.model, a.weight, a.capacity, dict(a.labels)) == (
        "v2",
        "eu",
        "m",
        90,
        4,
        {"gpu": "h100"},
    )
    assert snapshot.load == pytest.approx(8 / 8)
    assert snapshot.overall_load() == snapshot.load

    unknown = TelemetryHub(["x"], clock=clock)
    unknown.observe_scrape("x", ScrapeSample(running=3))
    assert unknown.snapshot().load is None and unknown.snapshot().overall_load() == 0.0


def test_inflight_without_scrapes_follows_littles_law(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock, half_life_s=10.0)
    for _ in range(600):  # 20 requests/s of 200 ms for 30 s: about 4 in flight
        clock.advance(0.05)
        hub.observe(ok(latency_ms=200.0, tokens=30))
    stats = hub.snapshot(force=True).backends["a"]
    assert stats.inflight == 4
    assert stats.rps == pytest.approx(20.0, rel=0.05)
    assert stats.tokens_per_s == pytest.approx(600.0, rel=0.05)
    assert stats.latency_p50_ms == pytest.approx(200.0, rel=0.06)


def test_scraped_ttft_histogram_becomes_live_observations(clock: FakeClock) -> None:
    hub = TelemetryHub(["a"], clock=clock)
    bounds = (0.1, 0.25, 0.5, 1.0, math.inf)

    def scrape(*cumulative: float) -> None:
        hub.observe_scrape("a", ScrapeSample(ttft_buckets=tuple(zip(bounds, cumulative, strict=True))))

    scrape(1000, 1000, 1000, 1000, 1000)  # history before we started: only a baseline
    assert hub.snapshot(force=True).backends["a"].ttft_p99_ms == 0.0
    clock.advance(1.0)
    scrape(1000, 1000, 1010, 1010, 1010)  # 10 new requests in (0.25 s, 0.5 s]
    ttft = hub.snapshot(force=True).backends["a"].ttft_p99_ms
    assert 250.0 < ttft < 550.0
    clock.advance(1.0)
    scrape(0, 0, 0, 5, 5)  # the backend restarted: counters start over
    ttft = hub.snapshot(force=True).backends["a"].ttft_p99_ms
    assert 500.0 < ttft < 1100.0


def test_passive_backends_are_never_stale(clock: FakeClock) -> None:
    hub = TelemetryHub([BackendSpec("static", passive=True), "scraped"], clock=clock, stale_after_s=5.0)
    clock.advance(60.0)
    backends = hub.snapshot(force=True).backends
    assert (
        not backends["static"].stale and backends["static"].healthy and math.isinf(backends["static"].age_s)
    )
    assert backends["scraped"].stale
    for _ in range(5):
        hub.observe(fail("static"))
    assert not hub.snapshot(force=True).backends["static"].healthy  # failures still eject it


def test_configure_keeps_state_of_remaining_backends(clock: FakeClock) -> None:
    hub = TelemetryHub(["a", "b"], clock=clock)
    hub.observe(ok("a"))
    hub.configure([BackendSpec("a", version="v3"), "c"])
    snapshot = hub.snapshot()
    assert list(snapshot.backends) == ["a", "c"]
    assert snapshot.backends["a"].version == "v3" and not snapshot.backends["a"].stale
    assert hub.knows("c") and not hub.knows("b")


def test_snapshot_converts_to_cel_values(clock: FakeClock) -> None:
    """The hub's snapshot (with an infinite age) feeds the decision messages, cached by identity."""
    hub = TelemetryHub(["a", "b"], clock=clock)
    hub.observe(ok("a"))
    builder = MessageBuilder()
    snapshot = hub.snapshot()
    message, backends = builder.telemetry(snapshot)
    assert builder.telemetry(hub.snapshot())[0] is message
    assert backends["b"].stale and math.isinf(backends["b"].age_s)  # type: ignore[attr-defined]
