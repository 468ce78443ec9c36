"""CheckRequest → attributes and Decision → CheckResponse, on hand-built protobufs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2
from prometheus_client import CollectorRegistry

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.decision import Decision
from policy_engine.envoy.check import attributes, check_response
from policy_engine.envoy.ratelimit import RateLimitService
from policy_engine.policy.compiler import load_bundle
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService
from tests.conftest import POLICIES


def request(body: bytes = b"", **headers: str) -> external_auth_pb2.CheckRequest:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host, http.size = "POST", "/v1/chat/completions", "gw.example", len(body)
    http.raw_body = body
    for key, value in headers.items():
        http.headers[key.replace("_", "-")] = value
    check.attributes.source.address.socket_address.address = "10.1.2.3"
    check.attributes.source.principal = "spiffe://cluster.local/ns/batch/sa/summarizer"
    check.attributes.context_extensions["gateway"] = "public"
    return check


def test_attributes_of_a_full_request() -> None:
    attrs = attributes(request(b'{"model": "m"}', Authorization="Bearer k", x_request_id="r1"), 1024)
    assert attrs.method == "POST" and attrs.path == "/v1/chat/completions" and attrs.host == "gw.example"
    assert attrs.headers == {"authorization": "Bearer k", "x-request-id": "r1"}
    assert attrs.id == "r1" and attrs.body == b'{"model": "m"}' and not attrs.body_truncated
    assert attrs.source.address == "10.1.2.3" and attrs.source.namespace == "batch"
    assert attrs.context == {"gateway": "public"}


def test_empty_request_has_defaults() -> None:
    attrs = attributes(external_auth_pb2.CheckRequest(), 1024)
    assert (attrs.method, attrs.path, attrs.body, attrs.headers) == ("GET", "/", b"", {})


def test_oversized_and_partial_bodies_are_marked_truncated() -> None:
    big = attributes(request(b"x" * 5000), 1000)
    assert big.body_truncated and len(big.body) == 1000
    partial = attributes(request(b'{"model": "m"', x_envoy_auth_partial_body="true"), 1000)
    assert partial.body_truncated


def test_raw_header_map_is_read() -> None:
    check = request()
    check.attributes.request.http.headers.clear()
    check.attributes.request.http.header_map.headers.add(key="X-Api-Key", raw_value=b"sk-\xff")
    assert attributes(check, 10).headers == {"x-api-key": "sk-\ufffd"}


def test_ok_response_sets_and_strips_routing_headers() -> None:
    decision = Decision(
        allowed=True,
        status=200,
        upstream_headers={"x-pe-route": "a"},
        response_headers={"x-ratelimit-limit": "5"},
        dynamic_metadata={"pe_total_tokens": '[["q/l/total_tokens/t", 3]]'},
    )
    response = check_response(
        decision, ["x-pe-route", "x-pe-canary", "authorization"], decision.dynamic_metadata
    )
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    assert [(h.header.key, h.header.value) for h in ok.headers] == [("x-pe-route", "a")]
    assert ok.headers[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(ok.headers_to_remove) == ["x-pe-canary"]
    assert ok.response_headers_to_add[0].header.key == "x-ratelimit-limit"
    assert response.dynamic_metadata.fields["pe_total_tokens"].string_value.startswith("[[")


def test_denied_response_is_an_openai_error() -> None:
    decision = Decision(
        allowed=False,
        status=429,
        reason="rate_limit_exceeded",
        message="slow down",
        response_headers={"retry-after": "7"},
    )
    response = check_response(decision, [])
    assert response.status.code == code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == 429
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers == {
        "content-type": "application/json",
        "x-pe-reason": "rate_limit_exceeded",
        "retry-after": "7",
    }
    assert json.loads(denied.body)["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_rate_limit_service_charges_usage_minus_reservation(tmp_path: Path) -> None:
    bundle = load_bundle(POLICIES)
    store = MemoryStore()
    service = RateLimitService(QuotaService(store, lambda: bundle, Metrics(CollectorRegistry())))
    counter = "tier-quotas/free-tokens/total_tokens/hobbyist"

    def descriptor(key: str, value: str, hits: int) -> ratelimit_pb2.RateLimitDescriptor:
        return ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)],
            hits_addend=wrappers_pb2.UInt64Value(value=hits),
        )

    call = rls_pb2.RateLimitRequest(
        domain="policy-engine",
        descriptors=[
            descriptor("pe_total_tokens", json.dumps([[counter, 10]]), 42),
            descriptor("pe_total_tokens", "not json", 42),  # ignored
            descriptor("pe_total_tokens", json.dumps([["forged/limit/total_tokens/x", 0]]), 99),  # unknown
            descriptor("pe_input_tokens", json.dumps([[counter, 0]]), 5),  # kind mismatch: ignored
            descriptor("other", "x", 1),
        ],
    )
    response = asyncio.run(service.ShouldRateLimit(call, None))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK and len(response.statuses) == 5
    used = asyncio.run(store.usage(counter, "hobbyist", 3600.0, "sliding"))
    assert used == 32  # 42 used - 10 reserved (the reservation was charged by Check, not here)
