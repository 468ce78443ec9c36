"""Envoy's access-log stream → observations, through a real grpc.aio server and client stub."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from policy_engine.telemetry.access_log import METHOD, AccessLogService, backend_name, parse_entry
from policy_engine.telemetry.hub import TelemetryHub


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def entry(
    cluster: str = "backend-a",
    status: int | None = 200,
    sent_ms: float | None = 2.0,
    first_rx_ms: float | None = 30.0,
    last_rx_ms: float | None = 120.0,
    end_ms: float | None = 121.0,
    flags: Iterable[str] = (),
    usage: dict[str, float] | None = None,
    content_type: str | None = None,
    upstream_address: bool = True,
) -> Any:
    log = accesslog_pb2.HTTPAccessLogEntry()
    common = log.common_properties
    common.upstream_cluster = cluster
    common.access_log_type = accesslog_pb2.AccessLogType.DownstreamEnd
    if upstream_address:
        common.upstream_remote_address.socket_address.address = "127.0.0.1"
        common.upstream_remote_address.socket_address.port_value = 8000
    for field, ms in (
        ("time_to_first_upstream_tx_byte", sent_ms),
        ("time_to_first_upstream_rx_byte", first_rx_ms),
        ("time_to_last_upstream_rx_byte", last_rx_ms),
        ("time_to_last_downstream_tx_byte", end_ms),
    ):
        if ms is not None:
            getattr(common, field).FromNanoseconds(int(ms * 1e6))
    for flag in flags:
        setattr(common.response_flags, flag, True)
    if usage is not None:
        common.metadata.filter_metadata["policy_engine.usage"].update(usage)
    if status is not None:
        log.response.response_code.value = status
    if content_type is not None:
        log.response.response_headers["content-type"] = content_type
    return log


def message(*entries: Any, log_name: str = "") -> Any:
    msg = als_pb2.StreamAccessLogsMessage()
    if log_name:
        msg.identifier.log_name = log_name
    msg.http_logs.log_entry.extend(entries)
    return msg


def test_parse_a_streamed_answer_with_usage() -> None:
    observation = parse_entry(
        entry(
            usage={"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
            content_type="text/event-stream",
        )
    )
    assert observation is not None
    assert observation.backend == "a" and observation.status == 200
    assert observation.latency_ms == pytest.approx(118.0)  # upstream time only
    assert observation.ttft_ms == pytest.approx(28.0)
    assert (observation.prompt_tokens, observation.completion_tokens, observation.tokens) == (12, 30, 42)
    assert not observation.failed and observation.succeeded


def test_parse_json_answer_has_no_ttft_when_content_type_is_logged() -> None:
    observation = parse_entry(entry(content_type="application/json"))
    assert observation is not None and observation.ttft_ms is None and observation.latency_ms is not None
    unlogged = parse_entry(entry())  # content-type not logged: the first byte is the proxy
    assert unlogged is not None and unlogged.ttft_ms == pytest.approx(28.0)


def test_parse_failures() -> None:
    refused = parse_entry(
        entry(
            status=503,
            flags=["upstream_connection_failure"],
            first_rx_ms=None,
            last_rx_ms=None,
            upstream_address=False,
        )
    )
    assert refused is not None and refused.connect_failure and refused.failed and refused.latency_ms is None
    # No host picked: Envoy leaves upstream_cluster empty; the route's name says which backend.
    no_host = entry(
        cluster="",
        status=503,
        flags=["no_healthy_upstream"],
        sent_ms=None,
        first_rx_ms=None,
        last_rx_ms=None,
        upstream_address=False,
    )
    assert parse_entry(no_host) is None
    no_host.common_properties.route_name = "backend-a"
    unhealthy = parse_entry(no_host)
    assert unhealthy is not None and unhealthy.backend == "a" and unhealthy.connect_failure
    timeout = parse_entry(
        entry(
            status=504, flags=["upstream_request_timeout"], first_rx_ms=None, last_rx_ms=None, end_ms=15002.0
        )
    )
    assert timeout is not None and not timeout.connect_failure and timeout.failed
    assert timeout.latency_ms == pytest.approx(15000.0)  # the hung backend's time, from the downstream end
    server_error = parse_entry(entry(status=500))
    assert server_error is not None and server_error.failed and not server_error.connect_failure


HOST = "llama-8b.models.svc.cluster.local"


@pytest.mark.parametrize(
    ("cluster", "route", "backend"),
    [
        ("backend-llama-8b-a", "", "llama-8b-a"),  # envoy-config's bootstrap
        (f"outbound|8000|llama-8b-a|{HOST}", "x", "llama-8b-a"),  # Istio: the subset names it
        (f"outbound|8000||{HOST}", "llama-8b-a", "llama-8b-a"),  # no subset: the route names it
        ("inbound|8000||", "default", "default"),  # a sidecar's inbound cluster names nothing
        ("", "backend-llama-8b-a", "llama-8b-a"),  # no host picked, in the bootstrap
        ("", "llama-8b-a", "llama-8b-a"),  # no host picked, in a mesh: the VirtualService route
        ("", "", None),
        ("backend-", "", None),
        ("policy-engine", "", None),
        (f"outbound|8000||{HOST}", "", None),
    ],
)
def test_the_backend_of_an_entry_from_its_cluster_or_route(
    cluster: str, route: str, backend: str | None
) -> None:
    assert backend_name(cluster, route) == backend
    log = entry(cluster=cluster)
    log.common_properties.route_name = route
    observation = parse_entry(log)
    assert (observation.backend if observation is not None else None) == backend


def test_the_first_name_the_hub_knows_wins() -> None:
    """A backend named `llama-3.1-8b` cannot be a subset (DNS labels have no dots): its route
    finds it; and the subset wins over a route holding several backends (a canary's)."""
    hub = TelemetryHub(["llama-3.1-8b", "llama-70b-v2"], clock=FakeClock())
    assert backend_name(f"outbound|8000|v318b|{HOST}", "llama-3.1-8b", hub.knows) == "llama-3.1-8b"
    canary = f"outbound|8000|llama-70b-v2|{HOST}"
    assert backend_name(canary, "llama-70b-rollout", hub.knows) == "llama-70b-v2"
    # Neither known: the first found, which the hub then counts as unknown.
    assert backend_name(f"outbound|8000|v318b|{HOST}", "other", hub.knows) == "v318b"
    service = AccessLogService(hub)
    log = entry(cluster=f"outbound|8000|v318b|{HOST}")
    log.common_properties.route_name = "llama-3.1-8b"
    assert service.ingest(message(log)) == 1
    assert hub.snapshot(force=True).backends["llama-3.1-8b"].error_rate == 0.0


def test_parse_ignores_what_is_not_about_a_backend() -> None:
    assert parse_entry(entry(cluster="policy-engine")) is None
    assert parse_entry(entry(cluster="backend-")) is None
    assert parse_entry(entry(cluster="")) is None
    # A local reply (ext_authz denial) may name the route's cluster but never reached it.
    denied = entry(status=403, sent_ms=None, first_rx_ms=None, last_rx_ms=None, upstream_address=False)
    denied.common_properties.response_flags.unauthorized_details.reason = 1
    assert parse_entry(denied) is None
    periodic = entry()
    periodic.common_properties.intermediate_log_entry = True
    assert parse_entry(periodic) is None
    start = entry()
    start.common_properties.access_log_type = accesslog_pb2.AccessLogType.DownstreamStart
    assert parse_entry(start) is None


def test_parse_tolerates_odd_metadata() -> None:
    odd = entry(usage={"prompt_tokens": -3, "completion_tokens": 1e300})
    odd.common_properties.metadata.filter_metadata["policy_engine.usage"].fields[
        "total_tokens"
    ].string_value = "x"
    observation = parse_entry(odd)
    assert observation is not None and observation.tokens == 0


def test_observed_tokens_add_up_the_native_readers_parts() -> None:
    observation = parse_entry(
        entry(
            usage={
                "prompt_tokens": 20,
                "input_tokens": 20,
                "cache_read_input_tokens": 7,
                "completion_tokens": 9,
            }
        )
    )
    assert observation is not None
    assert (observation.prompt_tokens, observation.completion_tokens, observation.total_tokens) == (27, 9, 36)


async def serve(service: AccessLogService, generated_helper: bool = False) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    if generated_helper:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(service, server)
    else:
        service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize("generated_helper", [False, True])
def test_stream_through_a_real_grpc_server(generated_helper: bool) -> None:
    clock = FakeClock()
    hub = TelemetryHub(["a", "b"], clock=clock)
    service = AccessLogService(hub)
    messages = [
        message(
            entry(usage={"total_tokens": 41}),
            entry(cluster="backend-b", status=500),
            log_name="policy-engine-als",
        ),
        message(
            entry(cluster="backend-unknown"),  # a backend the hub does not know
            entry(cluster="other-cluster"),  # not a backend cluster
            entry(cluster="backend-a", status=None, sent_ms=None, upstream_address=False),  # no upstream
        ),
        message(),  # an empty message
        message(entry(cluster="backend-b", flags=["upstream_connection_failure"], status=503)),
    ]

    async def scenario() -> Any:
        server, port = await serve(service, generated_helper)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = als_pb2_grpc.AccessLogServiceStub(channel)
                return await stub.StreamAccessLogs(iter(messages), timeout=30)
        finally:
            await server.stop(None)

    response = asyncio.run(scenario())
    assert isinstance(response, als_pb2.StreamAccessLogsResponse)
    counters = service.counters
    assert (counters.messages, counters.entries, counters.observed) == (4, 6, 3)
    assert (counters.unknown_backend, counters.ignored, counters.malformed) == (1, 2, 0)
    snapshot = hub.snapshot(force=True)
    a, b = snapshot.backends["a"], snapshot.backends["b"]
    assert not a.stale and a.error_rate == 0.0 and a.latency_p50_ms == pytest.approx(118.0, rel=0.1)
    assert a.tokens_per_s > 0
    assert not b.stale and b.error_rate == 1.0


def test_undecodable_messages_do_not_end_the_stream() -> None:
    hub = TelemetryHub(["a"], clock=FakeClock())
    service = AccessLogService(hub)
    good = message(entry()).SerializeToString()
    payloads = [good, b"\xff\xff\xff\x0f not a protobuf", message(entry(status=500)).SerializeToString()]

    async def scenario() -> Any:
        server, port = await serve(service)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_unary(
                    METHOD,
                    request_serializer=lambda raw: raw,
                    response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
                )
                return await call(iter(payloads), timeout=30)
        finally:
            await server.stop(None)

    response = asyncio.run(scenario())
    assert isinstance(response, als_pb2.StreamAccessLogsResponse)
    assert (service.counters.messages, service.counters.malformed, service.counters.observed) == (3, 1, 2)
    assert hub.snapshot(force=True).backends["a"].error_rate == pytest.approx(0.5)


def test_an_unreadable_entry_is_skipped() -> None:
    hub = TelemetryHub(["a"], clock=FakeClock())
    service = AccessLogService(hub, backend_of=lambda cluster, route: 1 / 0)  # type: ignore[arg-type,return-value]
    assert service.ingest(message(entry(), entry())) == 0
    assert service.counters.malformed == 2
    assert service.ingest(object()) == 0  # not even a message
    assert service.counters.malformed == 3
