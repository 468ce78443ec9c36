"""Token budgets spent by the usage backends report, charged by Envoy after each response."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import FREE, PRO, TOKEN_VARIANTS, Gateway, copied_gateway
from tests.mesh.istio_gateway import FAULT_ABORT_HEADER, RBAC_DENY_HEADER

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def charged(gateway: Gateway, kind: str) -> float:
    match = re.search(
        rf'^pe_tokens_charged_total{{kind="{kind}"}} ([0-9.e+]+)$', gateway.service.metrics(), re.M
    )
    return float(match.group(1)) if match else 0.0


def wait_charged(gateway: Gateway, kind: str, at_least: float) -> None:
    """Envoy charges when the stream is done, asynchronously: wait for it before going on."""
    deadline = time.monotonic() + 10
    while charged(gateway, kind) < at_least:
        assert time.monotonic() < deadline, f"{kind} never reached {at_least}: {charged(gateway, kind)}"
        time.sleep(0.05)


def test_total_token_budget_spent_by_json_responses(token_gateway: Gateway) -> None:
    for backend in token_gateway.backends.values():
        backend.behaviour.completion_tokens = 40
    url = f"{token_gateway.url}/v1/chat/completions"
    for n in range(1, 4):  # 41 tokens each: 0, 41, 82 used before each request (budget 100)
        response = httpx.post(url, json=CHAT, headers=FREE)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["total_tokens"] == 41
        wait_charged(token_gateway, "total_tokens", 41 * n)
    refused = httpx.post(url, json=CHAT, headers=FREE)
    assert refused.status_code == 429, refused.text
    assert refused.headers["x-ratelimit-limit"] == "100"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # An hour's budget: minutes to wait, past what OpenAI's SDKs would wait before retrying.
    assert (refused.headers["x-ratelimit-limit-tokens"], refused.headers["x-ratelimit-remaining-tokens"]) == (
        "100",
        "0",
    )
    assert int(refused.headers["retry-after-ms"]) > 60_000 and refused.headers["x-should-retry"] == "false"


def test_total_token_budget_spent_by_streamed_responses(token_gateway: Gateway) -> None:
    for backend in token_gateway.backends.values():
        backend.behaviour.completion_tokens = 40
        backend.behaviour.chunk_delay_ms = 5
    url = f"{token_gateway.url}/v1/chat/completions"
    streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    for n in range(1, 4):
        with httpx.stream("POST", url, json=streamed, headers=FREE) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"total_tokens": 41' in events[-2]
        wait_charged(token_gateway, "total_tokens", 41 * n)
    refused = httpx.post(url, json=streamed, headers=FREE)
    assert refused.status_code == 429


def test_input_and_output_budgets_are_charged_separately(token_gateway: Gateway) -> None:
    for backend in token_gateway.backends.values():
        backend.behaviour.completion_tokens = 30
    url = f"{token_gateway.url}/v1/chat/completions"
    for n in range(1, 4):  # output budget 70: 0, 30, 60 used before each request
        response = httpx.post(url, json=CHAT, headers=PRO)
        assert response.status_code == 200, response.text
        wait_charged(token_gateway, "output_tokens", 30 * n)
    assert charged(token_gateway, "input_tokens") == 3  # 1 prompt token each, far below its budget
    refused = httpx.post(url, json=CHAT, headers=PRO)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-limit"] == "70"


def test_a_json_answer_larger_than_envoys_buffer_is_charged_or_refused(token_gateway: Gateway) -> None:
    """Envoy buffers at most 1 MiB of a stream by default. The Lua reader scans a larger JSON
    answer as it passes (and once took seconds a megabyte); Envoy's json_to_metadata holds the
    answer to parse it whole, so a larger one fails with 500 rather than passing uncharged."""
    completion = 250_000  # 1.5 MB of content
    for backend in token_gateway.backends.values():
        backend.behaviour.completion_tokens = completion
    url = f"{token_gateway.url}/v1/chat/completions"
    response = httpx.post(url, json=CHAT, headers=FREE, timeout=10)
    if "envoy.filters.http.json_to_metadata" in json.dumps(token_gateway.envoy.config):
        assert response.status_code == 500, response.text[:300]
        return
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["choices"][0]["message"]["content"]) == completion * 6 - 1
    wait_charged(token_gateway, "total_tokens", completion + 1)


def _messages(gateway: Gateway, headers: dict[str, str], stream: bool) -> int:
    """One Anthropic-style /v1/messages call, read to its end; its status."""
    body = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers=headers) as response:
        text = "".join(response.iter_text())
        if response.status_code == 200 and stream:
            assert "event: message_delta" in text and '"output_tokens": 40' in text
        elif response.status_code == 200:
            usage = json.loads(text)["usage"]
            assert (usage["input_tokens"], usage["output_tokens"]) == (1, 40) and "total_tokens" not in usage
        return response.status_code


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_anthropic_messages_usage_is_charged(token_gateway: Gateway, stream: bool) -> None:
    """Anthropic's Messages API names its usage input_tokens and output_tokens, leaves the prompt
    tokens read from its cache out of input_tokens, reports no total, and streams the input in
    message_start and the output in message_delta. Every reader charges what the prompt and the
    answer cost: the Lua reader adds up in Envoy, the service for Envoy's native readers."""
    for backend in token_gateway.backends.values():
        backend.behaviour.completion_tokens = 40
        backend.behaviour.cached_prompt_tokens = 4
    for n in (1, 2):  # output budget 70: 0, then 40 used before each request
        assert _messages(token_gateway, PRO, stream) == 200
        wait_charged(token_gateway, "output_tokens", 40 * n)
    wait_charged(token_gateway, "input_tokens", 10)  # 1 prompt token and 4 cached, each
    assert charged(token_gateway, "input_tokens") == 10
    assert _messages(token_gateway, PRO, stream) == 429
    # The total budget (free tier, 100): prompt + output when the backend reports no total.
    for backend in token_gateway.backends.values():
        backend.behaviour.cached_prompt_tokens = 0
    for n in (1, 2, 3):  # 41 each: 0, 41, 82 used before each request
        assert _messages(token_gateway, FREE, stream) == 200
        wait_charged(token_gateway, "total_tokens", 41 * n)
    assert _messages(token_gateway, FREE, stream) == 429


def test_an_anthropic_stream_that_fails_after_its_start_is_charged_what_it_reported(
    token_gateway: Gateway,
) -> None:
    """Anthropic's message_start reports the input and an output of 1; a stream that then fails
    (an overloaded_error event) sends no message_delta. Every reader charges what message_start
    said, the total included, rather than keeping the reservation (1 + 50 max_tokens)."""
    for backend in token_gateway.backends.values():
        backend.behaviour.stream_error = True
    body = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{token_gateway.url}/v1/messages", json=body, headers=FREE) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200 and "overloaded_error" in text and "message_delta" not in text
    wait_charged(token_gateway, "total_tokens", 2)
    assert charged(token_gateway, "total_tokens") == 2


def _store_charges(gateway: Gateway) -> float:
    match = re.search(
        r'^pe_quota_store_seconds_count{operation="charge"} ([0-9.e+]+)$', gateway.service.metrics(), re.M
    )
    return float(match.group(1)) if match else 0.0


def test_a_request_no_backend_received_returns_its_reservation(token_gateway: Gateway) -> None:
    """With every backend down Envoy answers 503 itself: no tokens can have been spent, so the
    estimate reserved for the request comes back (over the access log; the rate-limit path has
    no call for it). Without that, two failed requests would fill the free budget (2 x 51 of 100)."""
    for backend in token_gateway.backends.values():
        backend.stop()
    body = {**CHAT, "max_tokens": 50}
    url = f"{token_gateway.url}/v1/chat/completions"
    config = json.dumps(token_gateway.envoy.config)
    if "envoy.filters.http.ratelimit" in config or "retry_policy" in config:
        # Charged by rate-limit calls, where a hits_addend of 0 only checks; or retried, as a
        # mesh retries refused connections, after which the access log cannot tell whether an
        # earlier attempt reached a backend: the reservations stay, as docs/operations.md says.
        statuses = [httpx.post(url, json=body, headers=FREE).status_code for _ in range(3)]
        assert statuses == [503, 503, 429]
        return
    for n in (1, 2):
        assert httpx.post(url, json=body, headers=FREE).status_code == 503
        deadline = time.monotonic() + 10
        while _store_charges(token_gateway) < n:
            assert time.monotonic() < deadline, "the reservation was never returned"
            time.sleep(0.05)
    assert httpx.post(url, json=body, headers=FREE).status_code == 503  # not 429


@pytest.mark.parametrize(("header", "status"), [(RBAC_DENY_HEADER, 403), (FAULT_ABORT_HEADER, 503)])
def test_a_request_the_mesh_answers_after_the_check_returns_its_reservation(
    tmp_path: Path, header: str, status: int
) -> None:
    """In the mesh's chain (assembled as istiod would), Istio's RBAC and fault filters run after
    ext_authz: a request they answer was admitted, with its estimate reserved, but reached no
    backend. The charging mark comes right after ext_authz, so its entry is still charged, with
    nothing, and the reservation comes back; marked any later, two such requests would fill the
    free budget (2 x 51 of 100) and the third would get 429."""
    for gw in copied_gateway(tmp_path, envoy_options=dict(TOKEN_VARIANTS["istio"])):
        url = f"{gw.url}/v1/chat/completions"
        body = {**CHAT, "max_tokens": 50}
        for n in (1, 2):
            assert httpx.post(url, json=body, headers={**FREE, header: "1"}).status_code == status
            deadline = time.monotonic() + 10
            while _store_charges(gw) < n:
                assert time.monotonic() < deadline, "the reservation was never returned"
                time.sleep(0.05)
        for backend in gw.backends.values():
            backend.behaviour.completion_tokens = 40
        assert httpx.post(url, json=body, headers=FREE).status_code == 200


def test_the_mesh_access_log_is_attributed_to_backends_by_istios_cluster_names(tmp_path: Path) -> None:
    """Istio names a backend's cluster `outbound|PORT|SUBSET|HOST` and its route after the
    VirtualService's; the service reads the backend from the subset, so live telemetry (latency,
    errors, the canary's counts) works behind an Istio gateway as behind envoy-config's."""
    for gw in copied_gateway(tmp_path, envoy_options=dict(TOKEN_VARIANTS["istio"])):
        assert "outbound|8000|model-a|" in json.dumps(gw.envoy.config)
        url = f"{gw.url}/v1/chat/completions"
        for _ in range(3):
            assert httpx.post(url, json=CHAT, headers=FREE).status_code == 200
        deadline = time.monotonic() + 10
        while _backend_requests(gw) < 3:
            assert time.monotonic() < deadline, gw.service.metrics()
            time.sleep(0.1)
        unknown = r'^pe_telemetry_access_log_entries_total{outcome="unknown_backend"} [1-9]'
        assert not re.search(unknown, gw.service.metrics(), re.M)


def _backend_requests(gateway: Gateway) -> float:
    pattern = r'^pe_telemetry_backend_requests_total{backend="model-[ab]"} ([0-9.e+]+)$'
    found = re.findall(pattern, gateway.service.metrics(), re.M)
    return sum(float(v) for v in found)
