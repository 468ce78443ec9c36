"""The metrics scraper against real simulated backends: values, failures, staleness, the loop."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from policy_engine.demo.backend import BackendBehaviour, BackendServer
from policy_engine.telemetry.hub import BackendSpec, TelemetryHub
from policy_engine.telemetry.scrape import MetricsScraper, parse_metrics

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.61
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 12345.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="llama"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="llama"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 3.2
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="1.0",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="llama"} 0.05
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def backend() -> Iterator[BackendServer]:
    server = BackendServer("a").start()
    yield server
    server.stop()


def metrics_url(backend: BackendServer) -> str:
    return f"http://127.0.0.1:{backend.port}/metrics"


def test_parse_a_vllm_page() -> None:
    sample = parse_metrics(VLLM_PAGE)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (5.0, 4.0, 0.61)
    assert sample.ttft_buckets == ((0.1, 6.0), (1.0, 10.0), (math.inf, 11.0))
    empty = parse_metrics("# nothing here\nother_metric 1\n")
    assert empty.running is None and empty.ttft_buckets is None
    with pytest.raises(ValueError):
        parse_metrics('vllm:num_requests_running{model_name="x"} not-a-number\n')


def test_scrape_a_loaded_backend_then_it_stops_and_goes_stale() -> None:
    backend = BackendServer("a", behaviour=BackendBehaviour(capacity=1, latency_ms=1000)).start()
    clock = FakeClock()
    hub = TelemetryHub(
        [BackendSpec("a", capacity=1, metrics_url=metrics_url(backend))], clock=clock, stale_after_s=5.0
    )
    url = f"http://127.0.0.1:{backend.port}/v1/chat/completions"
    results: list[int] = []
    clients = [
        threading.Thread(target=lambda: results.append(httpx.post(url, json=CHAT, timeout=60).status_code))
        for _ in range(3)
    ]

    async def scenario() -> None:
        scraper = MetricsScraper(hub, timeout_s=10.0)
        try:
            assert await scraper.scrape_once() == {"a": True}  # idle: the TTFT baseline
            for client in clients:
                client.start()
            await asyncio.to_thread(wait_for, lambda: backend.waiting == 2, "two requests queued")
            assert await scraper.scrape_once() == {"a": True}
            loaded = hub.snapshot(force=True)
            a = loaded.backends["a"]
            assert (a.inflight, a.queue_depth, a.kv_cache_usage) == (1, 2, 1.0)
            assert loaded.load == pytest.approx(3.0) and not a.stale
            backend.behaviour.latency_ms = 0  # the queued two now follow the first at once
            for client in clients:
                await asyncio.to_thread(client.join, 60)
            assert results == [200, 200, 200]
            # Slots are released just after the answers went out.
            await asyncio.to_thread(wait_for, lambda: backend.running == 0, "all slots free")
            await scraper.scrape_once()
            a = hub.snapshot(force=True).backends["a"]
            assert (a.inflight, a.queue_depth) == (0, 0)
            assert a.ttft_p99_ms > 500.0  # all three waited ~1 s for their first token

            backend.stop()
            clock.advance(1.0)
            assert await scraper.scrape_once() == {"a": False}
            a = hub.snapshot(force=True).backends["a"]
            assert not a.stale and a.age_s == pytest.approx(1.0)
            clock.advance(4.5)
            assert await scraper.scrape_once() == {"a": False}
            a = hub.snapshot(force=True).backends["a"]
            assert a.stale and a.age_s == pytest.approx(5.5) and a.healthy  # no data is not a failure
            status = hub.status("a")
            assert status is not None and status.scrape_failures == 2 and status.last_scrape_error
            assert scraper.failures == 2
            # Outcomes are counted when a scrape ends: started = succeeded + failed at rest.
            assert scraper.scrapes == scraper.successes + scraper.failures and scraper.successes >= 1
        finally:
            await scraper.stop()

    try:
        asyncio.run(scenario())
    finally:
        backend.stop()


def test_a_paused_backend_times_out_and_recovers(backend: BackendServer) -> None:
    hub = TelemetryHub(["a"], clock=FakeClock())
    admin = f"http://127.0.0.1:{backend.port}/admin/config"

    async def scenario() -> None:
        scraper = MetricsScraper(hub, {"a": metrics_url(backend)}, timeout_s=1.0)
        try:
            assert httpx.post(admin, json={"paused": True}, timeout=10).json()["paused"] is True
            assert await scraper.scrape_once() == {"a": False}
            status = hub.status("a")
            assert status is not None and "timed out" in status.last_scrape_error
            httpx.post(admin, json={"paused": False}, timeout=10)
            assert await scraper.scrape_once() == {"a": True}
        finally:
            await scraper.stop()

    asyncio.run(scenario())


def test_failures_of_every_kind_are_reported_not_raised(backend: BackendServer) -> None:
    hub = TelemetryHub(["a", "b", "c"], clock=FakeClock())
    targets = {
        "a": f"http://127.0.0.1:{backend.port}/nowhere",  # 404
        "b": "http://127.0.0.1:1/metrics",  # refused
        "c": f"http://127.0.0.1:{backend.port}/health",  # 200 but JSON: no metrics, still reachable
    }

    async def scenario() -> dict[str, bool]:
        scraper = MetricsScraper(hub, targets, timeout_s=5.0)
        try:
            return await scraper.scrape_once()
        finally:
            await scraper.stop()

    assert asyncio.run(scenario()) == {"a": False, "b": False, "c": True}
    status = hub.status("a")
    assert status is not None and status.last_scrape_error == "HTTP 404"


def test_the_loop_scrapes_until_stopped(backend: BackendServer) -> None:
    hub = TelemetryHub([BackendSpec("a", metrics_url=metrics_url(backend))])

    async def scenario() -> MetricsScraper:
        scraper = MetricsScraper(hub, interval_s=0.05, timeout_s=5.0)
        async with scraper:
            assert scraper.running
            deadline = time.monotonic() + 20
            while scraper.scrapes < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert not scraper.running
        scrapes = scraper.scrapes
        await asyncio.sleep(0.2)
        assert scraper.scrapes == scrapes  # really stopped
        return scraper

    scraper = asyncio.run(scenario())
    # Every scrape succeeded, but one cancelled by stop() counts as neither.
    assert scraper.failures == 0 and scraper.successes >= scraper.scrapes - 1 >= 2
    assert not hub.snapshot(force=True).backends["a"].stale
