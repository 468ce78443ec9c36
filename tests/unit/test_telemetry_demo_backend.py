"""The simulated backend's load model and admin knobs: capacity queue, errors, pause, /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from policy_engine.demo.backend import BackendBehaviour, BackendServer
from policy_engine.telemetry.scrape import parse_metrics

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def backend() -> Iterator[BackendServer]:
    server = BackendServer("demo").start()
    yield server
    server.stop()


def url(backend: BackendServer, path: str) -> str:
    return f"http://127.0.0.1:{backend.port}{path}"


def test_admin_config_reads_and_changes_every_knob(backend: BackendServer) -> None:
    current = httpx.get(url(backend, "/admin/config")).json()
    assert current == {
        "completion_tokens": 20,
        "latency_ms": 0.0,
        "chunk_delay_ms": 0.0,
        "status": 200,
        "capacity": 8,
        "error_rate": 0.0,
        "paused": False,
        "cached_prompt_tokens": 0,
        "provider_rate_headers": False,
        "stream_error": False,
    }
    changed = httpx.post(
        url(backend, "/admin/config"),
        json={"latency_ms": 5, "capacity": "3", "error_rate": 0.25, "status": 503, "paused": "false", "x": 1},
    ).json()
    assert changed["latency_ms"] == 5.0 and changed["capacity"] == 3 and changed["error_rate"] == 0.25
    assert changed["status"] == 503 and changed["paused"] is False and "x" not in changed
    assert backend.behaviour.capacity == 3
    refused = httpx.post(url(backend, "/admin/config"), json={"capacity": "many", "latency_ms": 1})
    assert refused.status_code == 400 and backend.behaviour.latency_ms == 5.0  # all or nothing


def test_status_and_error_rate_inject_errors(backend: BackendServer) -> None:
    backend.behaviour.status = 503
    response = httpx.post(url(backend, "/v1/chat/completions"), json=CHAT)
    assert response.status_code == 503 and response.headers["x-backend"] == "demo"
    backend.behaviour.status = 200
    backend.behaviour.error_rate = 1.0
    assert httpx.post(url(backend, "/v1/chat/completions"), json=CHAT).status_code == 500
    backend.behaviour.error_rate = 0.0
    answer = httpx.post(url(backend, "/v1/chat/completions"), json=CHAT)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 20


def test_requests_beyond_capacity_wait_in_a_queue(backend: BackendServer) -> None:
    backend.behaviour.capacity = 2
    backend.behaviour.latency_ms = 1500  # long enough for the queue to be seen on a busy machine
    statuses: list[int] = []
    clients = [
        threading.Thread(
            target=lambda: statuses.append(
                httpx.post(url(backend, "/v1/chat/completions"), json=CHAT, timeout=60).status_code
            )
        )
        for _ in range(5)
    ]
    for client in clients:
        client.start()
    wait_for(lambda: backend.running == 2 and backend.waiting == 3, "2 running, 3 waiting")
    sample = parse_metrics(httpx.get(url(backend, "/metrics")).text)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (2.0, 3.0, 1.0)
    # More room and no more delay: the queue drains at once.
    httpx.post(url(backend, "/admin/config"), json={"capacity": 8, "latency_ms": 0})
    for client in clients:
        client.join(60)
    assert statuses == [200] * 5
    # A handler releases its slot and counts the request just after the client has its answer.
    done = 'vllm:request_success_total{finished_reason="stop",model_name="demo"} 5.0'
    wait_for(lambda: backend.running == 0 and done in httpx.get(url(backend, "/metrics")).text, "all done")
    assert (backend.waiting, backend.requests) == (0, 5)
    sample = parse_metrics(httpx.get(url(backend, "/metrics")).text)
    assert sample.ttft_buckets is not None and sample.ttft_buckets[-1][1] == 5.0


def test_a_paused_backend_accepts_but_never_answers_until_unpaused(backend: BackendServer) -> None:
    httpx.post(url(backend, "/admin/config"), json={"paused": True})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url(backend, "/v1/chat/completions"), json=CHAT, timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url(backend, "/metrics"), timeout=0.3)
    assert httpx.get(url(backend, "/admin/config")).json()["paused"] is True  # admin still answers
    answers: list[int] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            httpx.post(url(backend, "/v1/embeddings"), json={"input": "x"}, timeout=60).status_code
        )
    )
    waiting.start()
    wait_for(lambda: backend.requests == 2, "the second request arrived")
    httpx.post(url(backend, "/admin/config"), json={"paused": False})
    waiting.join(60)
    assert answers == [200]


def test_stop_does_not_wait_for_hung_requests() -> None:
    backend = BackendServer("hung", behaviour=BackendBehaviour(paused=True)).start()
    outcome: list[str] = []

    def call() -> None:
        try:
            httpx.post(url(backend, "/v1/chat/completions"), json=CHAT, timeout=30)
            outcome.append("answered")
        except httpx.RemoteProtocolError:
            outcome.append("dropped")

    client = threading.Thread(target=call, daemon=True)
    client.start()
    wait_for(lambda: backend.requests == 1, "request arrived")
    stopper = threading.Thread(target=backend.stop)
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive()
    client.join(20)
    assert outcome == ["dropped"]  # released by the stop: the connection closes instead of hanging


def test_streams_still_report_usage(backend: BackendServer) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url(backend, "/v1/chat/completions"), json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"total_tokens"' in events[-2]


def test_images_and_audio_endpoints() -> None:
    import httpx

    from policy_engine.demo.backend import BackendServer

    backend = BackendServer("media").start()
    try:
        base = f"http://127.0.0.1:{backend.port}"
        image = httpx.post(
            f"{base}/v1/images/generations", json={"model": "sdxl", "prompt": "a lighthouse", "n": 2}
        )
        assert image.status_code == 200 and len(image.json()["data"]) == 2
        assert image.json()["data"][0]["b64_json"]
        audio = httpx.post(
            f"{base}/v1/audio/transcriptions",
            content=b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--x--\r\n'
            + b"\0" * 40000,
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert audio.status_code == 200 and audio.json()["text"] and audio.json()["usage"]["seconds"] == 2
        assert audio.headers["x-backend"] == "media" and backend.requests == 2
    finally:
        backend.stop()
