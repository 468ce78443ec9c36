"""Property tests: whatever arrives, the pipeline answers with a Decision and never fails inside."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.decide.attributes import Peer, RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

text = st.text(max_size=60)
header_names = st.sampled_from(
    ["authorization", "x-api-key", "x-region", "content-type", "x-pe-route", "x-user", "host"]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
header_values = (
    st.sampled_from(
        ["Bearer sk-acme-premium-key-0001", "Bearer sk-hobby-free-key-0003", "Bearer ", "eu", "", "\x00\xff"]
    )
    | text
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant"]) | json_scalars,
            "content": text
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3)
            | json_values,
        },
    )
    | json_values,
    max_size=4,
)
llm_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["llama-3-70b", "llama-3-8b-instruct", "llama-3-70b-v2", "text-embedding-3"])
        | json_values,
        "messages": messages | json_values,
        "prompt": text | st.lists(text, max_size=3) | json_values,
        "input": text | json_values,
        "max_tokens": st.integers() | st.floats() | json_values,
        "stream": json_values,
        "user": text | json_values,
        "temperature": json_values,
    },
)


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


bodies = (
    llm_bodies.map(encode)
    | json_values.map(encode)
    | st.binary(max_size=200)
    | st.sampled_from([b"", b"{", b'{"model": 1e400}', b'{"max_tokens": 1e999}', b"[" * 500 + b"]" * 500])
)
paths = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/audio/transcriptions",
        "/admin/x",
        "/",
    ]
) | text.map(lambda t: "/" + t)
backend_names = st.sampled_from(
    ["llama-70b-a100-a", "llama-70b-a100-b", "llama-8b-a", "embed-a", "sdxl", "x"]
)
backends = st.dictionaries(
    backend_names,
    st.builds(
        BackendStats,
        name=st.just("n"),
        healthy=st.booleans(),
        stale=st.booleans(),
        queue_depth=st.integers(0, 10_000),
        kv_cache_usage=st.floats(0, 1),
        latency_p99_ms=st.floats(0, 1e6),
        error_rate=st.floats(0, 1),
        inflight=st.integers(0, 1000),
        capacity=st.integers(0, 100),
    ),
    max_size=6,
)
requests = st.builds(
    RequestAttributes,
    method=st.sampled_from(["POST", "GET", "DELETE"]) | text,
    path=paths,
    host=text,
    headers=st.dictionaries(header_names, header_values, max_size=8),
    body=bodies,
    body_truncated=st.booleans(),
    size=st.integers(-1, 2**40),
    source=st.builds(
        Peer,
        principal=text | st.just("spiffe://cluster.local/ns/batch/sa/summarizer"),
        address=st.sampled_from(["10.1.1.1", "203.0.113.9", "::1", "not-an-ip", ""]),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attrs=requests, backends=backends, load=st.none() | st.floats(0, 2), weight=st.integers(-5, 200))
def test_every_input_gets_a_decision(
    example_pipeline: Pipeline,
    attrs: RequestAttributes,
    backends: dict[str, BackendStats],
    load: float | None,
    weight: int,
) -> None:
    snapshot = TelemetrySnapshot(backends=backends, load=load)
    decision = example_pipeline.decide(attrs, snapshot, canary_weights={"llama-70b-v2": weight})
    assert isinstance(decision, Decision)
    # The catch-all must not be what answered: every input is handled by the pipeline proper.
    assert decision.reason != "internal_error", decision.errors
    assert decision.allowed == (decision.status == 200)
    if decision.allowed:
        assert decision.body is None
    else:
        assert json.loads(decision.body or "")["error"]["code"] == decision.reason
        assert decision.upstream_headers == {}
    if decision.route is not None:
        assert decision.upstream_headers["x-pe-route"] == decision.route
