"""SIGTERM drains: a decision in flight when the service is told to stop still gets its answer."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from policy_engine.demo.backend import BackendServer
from policy_engine.envoy.bootstrap import Upstream
from tests.e2e.conftest import FREE, TRANSPORTS
from tests.e2e.harness import free_port, start_envoy, start_service
from tests.redis_server import start_redis

POLICIES = Path(__file__).resolve().parent / "redis_policies"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_in_flight_decision_finishes_after_sigterm(transport: str) -> None:
    """Over HTTP too: Envoy keeps its pooled connections to the HTTP port open, so the service
    must answer the request under way on them, not only stop accepting new ones."""
    redis = start_redis()
    backend = BackendServer("model-a").start()
    extra: list[str] = ["--no-reload"]
    envoy_options: dict[str, object] = {}
    if transport == "http":
        http_port = free_port()
        extra += ["--http-port", str(http_port)]
        envoy_options = {"authz_transport": "http", "policy_http": Upstream("127.0.0.1", http_port)}
    service = start_service(
        POLICIES,
        backends=["model-a"],
        redis_url=redis.url,
        extra_args=extra,
        env={"PE_REDIS_TIMEOUT_S": "5", "PE_GRACE_S": "10"},
    )
    envoy = start_envoy(service.port, {"model-a": backend.port}, authz_timeout_s=10.0, **envoy_options)
    try:
        assert httpx.post(f"{envoy.url}/v1/chat/completions", json=CHAT, headers=FREE).status_code == 200
        assert redis.pid is not None
        os.kill(redis.pid, signal.SIGSTOP)  # the next decision waits on its counters
        answer: list[int] = []
        client = threading.Thread(
            target=lambda: answer.append(
                httpx.post(
                    f"{envoy.url}/v1/chat/completions", json=CHAT, headers=FREE, timeout=30
                ).status_code
            )
        )
        client.start()
        time.sleep(1.0)  # the Check call is now in flight, blocked on Redis
        service.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert service.process.poll() is None, "the service quit with a call in flight"
        os.kill(redis.pid, signal.SIGCONT)
        client.join(30)
        assert answer == [200]
        assert service.process.wait(20) == 0
        assert "draining" in service.output()
    finally:
        if redis.pid is not None:
            os.kill(redis.pid, signal.SIGCONT)
        envoy.stop()
        service.stop()
        backend.stop()
        redis.close()


def test_an_unreachable_collector_does_not_hold_the_stop_past_the_grace_period() -> None:
    """The OTLP exporter retries a collector that does not answer for its own timeout (30 s
    here); the pod would be killed first. The service stops within its grace period, dropping
    the spans, and says so."""
    backend = BackendServer("model-a").start()
    service = start_service(
        POLICIES,
        backends=["model-a"],
        extra_args=["--no-reload"],
        env={
            "PE_GRACE_S": "2",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "30",
            "OTEL_BSP_SCHEDULE_DELAY": "60000",  # the span stays queued until the stop
        },
    )
    envoy = start_envoy(service.port, {"model-a": backend.port})
    try:
        assert httpx.post(f"{envoy.url}/v1/chat/completions", json=CHAT, headers=FREE).status_code == 200
        stopped = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(25) == 0
        took = time.monotonic() - stopped
        assert "decision spans still queued were dropped" in service.output(), service.output()[-2000:]
        assert took < 12, took  # the grace period (2 s) and the process's exit, not the exporter's 30 s
    finally:
        envoy.stop()
        service.stop()
        backend.stop()
