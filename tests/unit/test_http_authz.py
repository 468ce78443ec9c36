"""The HTTP ext_authz server over a real loopback socket: framing, keep-alive, bad input.

The decisions themselves are the gRPC path's (same `AuthorizationService.decide`); through a
real Envoy both transports run tests/e2e/test_gateway.py and test_tokens.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.envoy.authz import AuthorizationService
from policy_engine.envoy.check import MAX_HEADERS
from policy_engine.envoy.http_authz import (
    CONTENT_LENGTH,
    DENIAL_CARRIERS,
    SOURCE_ADDRESS,
    http_response,
    request_attributes,
    serve_http,
    unforwarded_headers,
)
from policy_engine.policy.compiler import load_bundle
from policy_engine.policy.schema import RESERVED_STATUSES
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService
from policy_engine.quota.store import Admission, Demand
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
CHAT = json.dumps({"model": "llama-3-8b-instruct", "messages": [{"role": "user", "content": "hi"}]}).encode()


class _RoundTripStore(MemoryStore):
    """The in-memory store behind a real wait, as a network store (Redis) answers."""

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        await asyncio.sleep(0.002)
        return await super().admit(demands)


def _service(store: MemoryStore | None = None) -> AuthorizationService:
    bundle = load_bundle(EXAMPLES)
    pipeline = Pipeline(bundle)
    metrics = Metrics(CollectorRegistry())
    snapshot = TelemetrySnapshot({name: BackendStats(name) for name in ("llama-8b-a", "llama-8b-b")})
    quota = QuotaService(store if store is not None else MemoryStore(), lambda: bundle, metrics)
    return AuthorizationService(lambda: pipeline, lambda: snapshot, quota, metrics, 1 << 20)


def _request(headers: dict[str, str], body: bytes = CHAT, path: str = "/v1/chat/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: gateway", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _exchange(
    payload: bytes, answers: int, store: MemoryStore | None = None
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read `answers` responses (or until the server closes)."""
    server = await serve_http(_service(store), "127.0.0.1", 0, 1 << 20, reuse_port=False)
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    results = []
    try:
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            results.append((status, headers, body))
    except asyncio.IncompleteReadError:
        pass
    writer.close()
    server.server.close()
    return results


def test_allowed_request_answers_200_with_the_route_and_the_rate_headers() -> None:
    headers = {"authorization": "Bearer sk-hobby-free-key-0003", "content-type": "application/json"}
    [(status, answer, body)] = asyncio.run(_exchange(_request(headers), 1))
    assert status == 200 and body == b""
    assert answer["x-pe-route"] in ("llama-8b-a", "llama-8b-b")
    assert answer["x-pe-tenant"] == "hobbyist"
    assert int(answer["x-ratelimit-remaining"]) < int(answer["x-ratelimit-limit"])
    # Token-charging metadata travels as pe_* headers (Envoy's dynamic_metadata_from_headers).
    assert json.loads(answer["pe_total_tokens"])[0][0].startswith("tier-quotas/free-tokens/")


def test_denial_is_the_answer_itself() -> None:
    [(status, answer, body)] = asyncio.run(_exchange(_request({"content-type": "application/json"}), 1))
    assert status == 401
    assert answer["x-pe-reason"] == "missing_api_key"
    assert json.loads(body)["error"]["code"] == "missing_api_key"


def test_keep_alive_answers_requests_in_order() -> None:
    good = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
    bad = _request({"authorization": "Bearer sk-not-a-key-0000"})
    answers = asyncio.run(_exchange(good + bad + good, 3))
    assert [status for status, _, _ in answers] == [200, 401, 200]


def test_a_decision_that_waits_for_its_store_keeps_the_answers_in_order() -> None:
    good = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
    bad = _request({"authorization": "Bearer sk-not-a-key-0000"})
    answers = asyncio.run(_exchange(good + bad + good + good, 4, store=_RoundTripStore()))
    assert [status for status, _, _ in answers] == [200, 401, 200, 200]
    remaining = [int(headers["x-ratelimit-remaining"]) for status, headers, _ in answers if status == 200]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == 3


def test_a_long_run_of_pipelined_requests_is_answered_in_order() -> None:
    # A buffer holding thousands of requests: each answered once, in order, nothing dropped.
    good = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
    bad = _request({"authorization": "Bearer sk-not-a-key-0000"})
    answers = asyncio.run(_exchange((good + bad) * 1500, 3000))
    statuses = [status for status, _, _ in answers]
    assert len(statuses) == 3000
    assert set(statuses[1::2]) == {401}
    assert set(statuses[0::2]) <= {200, 429} and statuses[0] == 200


def test_the_source_address_is_the_header_envoy_sets() -> None:
    key = {"authorization": "Bearer sk-acme-premium-key-0001"}
    inside = _request({**key, SOURCE_ADDRESS: "10.1.2.3"}, body=b"", path="/admin/config")
    outside = _request({**key, SOURCE_ADDRESS: "192.0.2.1"}, body=b"", path="/admin/config")
    answers = asyncio.run(_exchange(inside + outside, 2))
    # admin-api answers only inside the cluster network.
    assert answers[0][1].get("x-pe-reason") != "admin_forbidden"
    assert (answers[1][0], answers[1][1]["x-pe-reason"]) == (403, "admin_forbidden")


def test_malformed_input_gets_an_error_and_a_closed_connection() -> None:
    for payload, status in (
        (b"NONSENSE\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nx: " + b"a" * 70000, 431),
    ):
        answers = asyncio.run(_exchange(payload, 1))
        assert [a[0] for a in answers] == [status], payload[:40]


def test_a_body_split_across_packets_is_awaited() -> None:
    async def split() -> int:
        server = await serve_http(_service(), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
        for start in range(0, len(payload), 7):
            writer.write(payload[start : start + 7])
            await writer.drain()
            await asyncio.sleep(0)
        status = int((await reader.readuntil(b"\r\n")).split(b" ")[1])
        writer.close()
        server.server.close()
        return status

    assert asyncio.run(split()) == 200


def test_a_head_denial_has_no_body_and_the_connection_goes_on() -> None:
    head = b"HEAD /v1/models HTTP/1.1\r\nhost: gateway\r\n\r\n"
    good = _request({"authorization": "Bearer sk-hobby-free-key-0003"})

    async def run() -> tuple[bytes, int]:
        server = await serve_http(_service(), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + good)
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        # No body after a HEAD answer: the next bytes are the next answer's status line.
        second = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        writer.close()
        server.server.close()
        return first, int(second.split(b" ")[1])

    first, second_status = asyncio.run(run())
    assert first.startswith(b"HTTP/1.1 401") and b"content-length: 0\r\n" in first
    assert second_status == 200


def test_ambiguous_lengths_are_refused() -> None:
    for lengths in ("content-length: 5\r\ncontent-length: 0", "content-length: +5", "content-length: 1_0"):
        payload = f"POST / HTTP/1.1\r\n{lengths}\r\n\r\nhello".encode()
        answers = asyncio.run(_exchange(payload, 2))
        assert [a[0] for a in answers] == [400], lengths


def test_header_values_are_utf8_as_over_grpc() -> None:
    decision = Decision(allowed=True, status=200, upstream_headers={"x-pe-u": "é日"})
    assert "x-pe-u: é日\r\n".encode() in http_response(decision)


def test_attributes_match_the_grpc_ones() -> None:
    headers = {
        "host": "ai.example.com",
        "authorization": "Bearer k",
        CONTENT_LENGTH: "5000",
        SOURCE_ADDRESS: "10.0.0.7",
        "x-envoy-internal": "true",
        "x-envoy-expected-rq-timeout-ms": "1000",
    }
    attrs = request_attributes("POST", "/v1/chat/completions?x=1", headers, b"{}", 1 << 20)
    assert attrs.size == 5000 and attrs.source.address == "10.0.0.7"
    assert attrs.headers[":authority"] == "ai.example.com" and attrs.headers[":path"].endswith("?x=1")
    assert attrs.headers["content-length"] == "5000"
    assert not any(name.startswith(("x-pe-authz-", "x-envoy-")) for name in attrs.headers)


def test_5xx_denials_are_carried_and_4xx_ones_are_not() -> None:
    # Envoy takes a 5xx answer for a failure of the service; the bootstrap maps the carriers back.
    def answered(status: int) -> int:
        decision = Decision(allowed=False, status=status, reason="r")
        return int(http_response(decision).split(b" ")[1])

    assert [answered(status) for status in (500, 503, 504, 511)] == [480, 483, 484, 491]
    assert answered(599) == DENIAL_CARRIERS[503]  # beyond the standard codes: 503
    assert [answered(status) for status in (400, 401, 429, 499)] == [400, 401, 429, 499]
    assert set(DENIAL_CARRIERS.values()) == set(RESERVED_STATUSES)


def test_any_transfer_encoding_is_refused_and_never_read_as_a_second_request() -> None:
    chunk = b"5\r\nhello\r\n0\r\n\r\n"
    for encoding in (b"Chunked", b"chunked\r\ntransfer-encoding: identity", b"gzip"):
        payload = (
            b"POST / HTTP/1.1\r\ntransfer-encoding: " + encoding + b"\r\ncontent-length: 19\r\n\r\n" + chunk
        )
        answers = asyncio.run(_exchange(payload, 2))
        assert [a[0] for a in answers] == [501], encoding


def test_a_length_envoy_did_not_write_still_gets_an_answer() -> None:
    # "²" passes str.isdigit(); a request after it on the same connection must not hang either.
    odd = _request({"authorization": "Bearer sk-hobby-free-key-0003", CONTENT_LENGTH: "²"})
    good = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
    assert [a[0] for a in asyncio.run(_exchange(odd + good, 2))] == [200, 200]


def test_a_cancelled_decision_is_answered_and_the_connection_closed() -> None:
    class Cancelled(MemoryStore):
        async def admit(self, demands: Sequence[Demand]) -> Admission:
            raise asyncio.CancelledError  # as at shutdown

    headers = {"authorization": "Bearer sk-hobby-free-key-0003"}
    answers = asyncio.run(_exchange(_request(headers) * 2, 2, store=Cancelled()))
    assert [a[0] for a in answers] == [503] and answers[0][1]["connection"] == "close"


def test_envoys_own_headers_survive_the_header_cap() -> None:
    many = {f"x-client-{index}": "v" for index in range(MAX_HEADERS + 10)}
    key = {"authorization": "Bearer sk-acme-premium-key-0001"}
    # Envoy appends the peer address after the client's headers.
    payload = _request({**key, **many, SOURCE_ADDRESS: "192.0.2.1"}, body=b"", path="/admin/config")
    [(status, answer, _)] = asyncio.run(_exchange(payload, 1))
    assert (status, answer["x-pe-reason"]) == (403, "admin_forbidden")


def test_control_characters_never_reach_a_header_line() -> None:
    decision = Decision(
        allowed=True, status=200, upstream_headers={"x-pe-u": "a\r\nx-injected: 1\x00b\x7f\tc"}
    )
    answer = http_response(decision)
    assert b"x-pe-u: a  x-injected: 1 b \tc\r\n" in answer
    assert b"\r\nx-injected" not in answer


class _SlowStore(MemoryStore):
    """Counters that take a while to answer: a decision stays in flight."""

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        await asyncio.sleep(0.3)
        return await super().admit(demands)


def test_draining_answers_the_request_in_flight_then_closes_every_connection() -> None:
    async def run() -> tuple[bytes, bytes, bytes, bool]:
        server = await serve_http(_service(_SlowStore()), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", server.port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        busy_writer.write(_request({"authorization": "Bearer sk-hobby-free-key-0003"}))
        await busy_writer.drain()
        await asyncio.sleep(0.1)  # the decision now waits on its counters
        drained = asyncio.ensure_future(server.drain(10.0))
        answer = await asyncio.wait_for(busy_reader.read(), 10)  # to the close
        idle = await asyncio.wait_for(idle_reader.read(), 10)
        await asyncio.wait_for(drained, 10)
        refused = False
        try:
            await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            refused = True
        for writer in (busy_writer, idle_writer):
            writer.close()
        return answer.split(b"\r\n", 1)[0], answer, idle, refused

    status_line, answer, idle, refused = asyncio.run(run())
    assert status_line == b"HTTP/1.1 200 OK"
    assert b"\r\nconnection: close\r\n" in answer  # Envoy's pool will not send another
    assert idle == b"" and refused


def test_draining_drops_what_outlives_the_grace_period() -> None:
    async def run() -> bytes:
        server = await serve_http(_service(_SlowStore()), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_request({"authorization": "Bearer sk-hobby-free-key-0003"}))
        await writer.drain()
        await asyncio.sleep(0.05)
        await server.drain(0.05)
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            return b""
        finally:
            writer.close()

    assert asyncio.run(run()) == b""


def test_draining_waits_for_a_request_still_arriving() -> None:
    async def run() -> bytes:
        server = await serve_http(_service(), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        payload = _request({"authorization": "Bearer sk-hobby-free-key-0003"})
        writer.write(payload[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        drained = asyncio.ensure_future(server.drain(10.0))
        await asyncio.sleep(0.05)
        writer.write(payload[40:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        await asyncio.wait_for(drained, 10)
        writer.close()
        return answer

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"\r\nconnection: close\r\n" in answer


def test_a_connection_set_up_after_the_drain_began_answers_its_request_then_closes() -> None:
    """asyncio calls connection_made a loop turn or two after accepting: a connection accepted
    just before the listener closed joins after drain() looked at the open ones. Envoy opened
    it to send a request: that one is answered; a connection that sends nothing is closed."""

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.closed = False
            self.sent = b""

        def write(self, data: bytes | bytearray | memoryview) -> None:
            self.sent += bytes(data)

        def close(self) -> None:
            self.closed = True

    async def run() -> tuple[bytes, bool, bool]:
        server = await serve_http(_service(), "127.0.0.1", 0, 1 << 20, reuse_port=False)
        drained = asyncio.ensure_future(server.drain(2.0))
        await asyncio.sleep(0)  # the drain has begun, with no connection open
        factory = server.server._protocol_factory  # type: ignore[attr-defined]
        busy, idle = factory(), factory()
        busy_transport, idle_transport = Transport(), Transport()
        busy.connection_made(busy_transport)
        idle.connection_made(idle_transport)
        await asyncio.sleep(0.01)  # the request is on its way
        open_for_it = not busy_transport.closed
        busy.data_received(_request({"authorization": "Bearer sk-hobby-free-key-0003"}))
        await asyncio.sleep(0.3)
        busy.connection_lost(None)
        idle.connection_lost(None)
        await drained
        return busy_transport.sent, open_for_it and busy_transport.closed, idle_transport.closed

    sent, busy_answered_then_closed, idle_closed = asyncio.run(run())
    assert sent.startswith(b"HTTP/1.1 200 OK") and b"\r\nconnection: close\r\n" in sent
    assert busy_answered_then_closed and idle_closed


def test_headers_the_http_transport_would_drop_are_named(tmp_path: Path) -> None:
    import shutil

    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLES, policies)
    assert unforwarded_headers(load_bundle(policies)) == []  # the examples use x-pe-* only
    canary = policies / "canary.yaml"
    canary.write_text(canary.read_text().replace("header: x-pe-canary", "header: x-canary"))
    routing = policies / "routing.yaml"
    routing.write_text(
        routing.read_text().replace(
            "      headers:\n", "      headers:\n        x-model-version: '\"v1\"'\n", 1
        )
    )
    assert unforwarded_headers(load_bundle(policies)) == ["x-canary", "x-model-version"]
