"""Fuzzing the running service over real gRPC: random CheckRequests and RateLimitRequests.

Whatever arrives, the service answers within its deadline with a well-formed response and keeps
serving. The examples are bounded (hypothesis `max_examples`) so the test ends by itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.harness import ROOT, ServiceProcess, start_service
from tests.unit.test_properties import bodies, header_names, header_values, paths

DEADLINE_S = 5.0  # generous on a loaded 2-core machine; a hang would hit it
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

raw_bytes = st.binary(max_size=64)
principals = st.sampled_from(["", "spiffe://cluster.local/ns/apps/sa/chat", "spiffe://x/y"]) | st.text(
    max_size=40
)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id=draw(st.text(max_size=20)),
        method=draw(st.sampled_from(["POST", "GET", "", "DELETE"]) | st.text(max_size=8)),
        path=draw(paths),
        host=draw(st.text(max_size=30)),
        scheme=draw(st.sampled_from(["http", "https", ""])),
        protocol=draw(st.sampled_from(["HTTP/1.1", "HTTP/2", ""])),
        size=draw(st.integers(min_value=-1, max_value=2**40)),
        query=draw(st.text(max_size=20)),
    )
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=12))
    if draw(st.booleans()):  # Envoy's raw header map: values as bytes, possibly not UTF-8
        for name, value in headers:
            http.header_map.headers.add(key=name, raw_value=value.encode("utf-8", "surrogatepass"))
        for _ in range(draw(st.integers(0, 3))):
            http.header_map.headers.add(key=draw(header_names), raw_value=draw(raw_bytes))
    else:
        for name, value in headers:
            http.headers[name] = value
    body = draw(bodies)
    if draw(st.booleans()):
        http.raw_body = body
    else:
        http.body = body.decode("utf-8", "replace")
    context = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        source=attribute_context_pb2.AttributeContext.Peer(
            principal=draw(principals),
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=draw(st.sampled_from(["10.1.2.3", "::1", "x"]))
                )
            ),
            labels=draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)),
        ),
        context_extensions=draw(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3)),
    )
    return external_auth_pb2.CheckRequest(attributes=context)


descriptor_keys = st.sampled_from(
    ["pe_input_tokens", "pe_output_tokens", "pe_total_tokens", "generic_key"]
) | st.text(max_size=16)


@st.composite
def rate_limit_requests(draw: st.DrawFn) -> rls_pb2.RateLimitRequest:
    request = rls_pb2.RateLimitRequest(
        domain=draw(st.text(max_size=12)), hits_addend=draw(st.integers(0, 2**32 - 1))
    )
    for _ in range(draw(st.integers(0, 6))):
        descriptor = ratelimit_pb2.RateLimitDescriptor()
        for _ in range(draw(st.integers(0, 4))):
            descriptor.entries.add(key=draw(descriptor_keys), value=draw(st.text(max_size=80)))
        if draw(st.booleans()):
            descriptor.hits_addend.value = draw(st.integers(0, 2**64 - 1))
        request.descriptors.append(descriptor)
    return request


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    process = start_service(ROOT / "policies")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(service: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.address) as channel:
        yield channel


def assert_alive(service: ServiceProcess) -> None:
    assert service.process.poll() is None, service.output()


@FUZZ
@given(request=check_requests())
def test_every_check_request_gets_a_well_formed_answer(
    service: ServiceProcess, channel: grpc.Channel, request: external_auth_pb2.CheckRequest
) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    response = stub.Check(request, timeout=DEADLINE_S)
    if response.status.code == code_pb2.OK:
        assert response.HasField("ok_response")
        routed = {h.header.key for h in response.ok_response.headers}
        assert all(key.startswith("x-pe-") for key in routed), routed
    else:
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert response.denied_response.status.code >= 400
        assert any(h.header.key == "x-pe-reason" for h in response.denied_response.headers)
    assert_alive(service)


@FUZZ
@given(request=rate_limit_requests())
def test_every_rate_limit_request_gets_a_well_formed_answer(
    service: ServiceProcess, channel: grpc.Channel, request: rls_pb2.RateLimitRequest
) -> None:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    response = stub.ShouldRateLimit(request, timeout=DEADLINE_S)
    assert response.overall_code in (rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT)
    assert len(response.statuses) == len(request.descriptors)
    assert_alive(service)


def flood(body_bytes: int) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="POST", path="/v1/chat/completions")
    for index in range(5000):
        http.header_map.headers.add(key=f"x-filler-{index}", raw_value=b"v" * 64)
    turn = b'{"role": "user", "content": "hi"},'
    http.raw_body = b'{"model": "llama-3-70b", "messages": [' + turn * (body_bytes // len(turn))
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def test_a_flood_of_headers_and_a_large_body_are_bounded(
    service: ServiceProcess, channel: grpc.Channel
) -> None:
    """Limits: headers past MAX_HEADERS are ignored, a body past max_body_bytes is truncated."""
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    response = stub.Check(flood(3 << 20), timeout=DEADLINE_S * 4)
    assert response.status.code == code_pb2.PERMISSION_DENIED  # no API key among the kept headers
    assert response.denied_response.status.code == 401
    assert_alive(service)


def test_a_message_past_the_grpc_limit_is_refused_not_read(
    service: ServiceProcess, channel: grpc.Channel
) -> None:
    """gRPC's 4 MiB receive limit: Envoy answers such a call by its status_on_error."""
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Check(flood(6 << 20), timeout=DEADLINE_S * 4)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_alive(service)
