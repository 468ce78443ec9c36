"""Envoy's HTTP ext_authz protocol, served from asyncio next to the gRPC port.

Envoy's `http_service` mode sends the client's request (method, path, headers, the buffered
body) to this server and reads the answer: 200 lets the request through and copies the
response's `x-pe-*` headers upstream, `x-ratelimit-*` to the client and `pe_*` headers into
the filter's dynamic metadata (the token-charging keys); any other status is the denial the
client gets, body and headers included. The bootstrap (`envoy-config --authz-transport http`)
configures those header patterns and passes the peer's address and SPIFFE principal in the
`x-pe-authz-*` headers below; it also strips every client `x-pe-*` header before ext_authz.

Why a second transport: a Python gRPC ext_authz costs ~320 µs of CPU per request before any
decision and adds milliseconds of latency on its own; the same do-nothing server over HTTP on
asyncio costs ~30 µs (docs/BENCHMARKS.md). Decisions, quotas, metrics and audit are the gRPC
path's (`AuthorizationService.decide`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus

from policy_engine.decide.attributes import Peer, RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.envoy.authz import AuthorizationService
from policy_engine.envoy.bootstrap import SERVICE_HEADER_PREFIX
from policy_engine.envoy.check import MAX_HEADERS, PARTIAL_BODY_HEADER
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.schema import RESERVED_STATUSES

log = logging.getLogger("policy_engine.http_authz")

SOURCE_ADDRESS = "x-pe-authz-source-address"
SOURCE_PRINCIPAL = "x-pe-authz-source-principal"
DESTINATION_ADDRESS = "x-pe-authz-destination-address"
CONTENT_LENGTH = "x-pe-authz-content-length"  # the client's, before Envoy buffered or cut the body
_ENVOY_HEADERS = frozenset(
    # Set by Envoy on its own authorization request, not by the client.
    {SOURCE_ADDRESS, SOURCE_PRINCIPAL, DESTINATION_ADDRESS, CONTENT_LENGTH}
    | {"x-envoy-internal", "x-envoy-expected-rq-timeout-ms"}
)
# Envoy's HTTP ext_authz client takes any 5xx answer for a failure of the authorization
# service, not for a denial: the client would get a bare `status_on_error` (or, with
# failure_mode_allow, the request would pass). A 5xx denial (shedding, no backend, a store that
# fails closed) is therefore answered with a carrier status, which the bootstrap's
# local_reply_config turns back into the real one, body and headers kept. The carriers are
# reserved: policies cannot deny with them (policy_engine.policy.schema).
DENIAL_CARRIERS = dict(zip(range(500, 512), RESERVED_STATUSES, strict=True))  # 500-511 -> 480-491
_UNLISTED_5XX_CARRIER = DENIAL_CARRIERS[503]  # a 5xx beyond 511 reaches the client as 503


def wire_status(status: int) -> int:
    """The status a denial is answered with over HTTP (see DENIAL_CARRIERS)."""
    if 500 <= status <= 599:
        return DENIAL_CARRIERS.get(status, _UNLISTED_5XX_CARRIER)
    return status


def unforwarded_headers(bundle: Bundle) -> list[str]:
    """Upstream headers the policies set that Envoy's HTTP transport drops: it forwards only
    the answer's x-pe-* headers (the bootstrap's allowed_upstream_headers)."""
    names = [policy.header for policy in bundle.canary]
    names += [name for policy in bundle.routing for route in policy.routes for name, _ in route.headers]
    return sorted({name for name in names if not name.lower().startswith(SERVICE_HEADER_PREFIX)})


MAX_HEAD_BYTES = 65536  # request line and headers; more is refused
LATE_REQUEST_WAIT_S = 0.1  # how long a connection opened as the drain began waits for its request
MAX_BODY_BYTES = 64 << 20  # Envoy sends at most its max_request_bytes


def request_attributes(
    method: str, target: str, headers: Mapping[str, str], body: bytes, max_body: int
) -> RequestAttributes:
    """What the pipeline decides on, from the request Envoy forwarded for authorization; the
    headers as the gRPC Check has them (pseudo-headers included, Envoy's own excluded)."""
    client = {k: v for k, v in headers.items() if k not in _ENVOY_HEADERS}
    client.update({":authority": client.get("host", ""), ":method": method, ":path": target})
    declared = headers.get(CONTENT_LENGTH, "")
    if not (declared.isascii() and declared.isdigit()):  # "²" is a digit to str.isdigit
        declared = ""
    if declared:
        client["content-length"] = declared
    truncated = client.get(PARTIAL_BODY_HEADER) == "true" or len(body) > max_body
    return RequestAttributes(
        method=method or "GET",
        path=target or "/",
        host=client.get("host", ""),
        scheme=client.get("x-forwarded-proto", ""),
        protocol="",
        id=client.get("x-request-id", ""),
        headers=client,
        body=body[:max_body],
        body_truncated=truncated,
        size=int(declared) if declared else -1,
        time=datetime.now(UTC),
        source=Peer(principal=headers.get(SOURCE_PRINCIPAL, ""), address=headers.get(SOURCE_ADDRESS, "")),
        destination=Peer(address=headers.get(DESTINATION_ADDRESS, "")),
    )


# Control characters become spaces in header values: a line break would split the answer, and
# Envoy's parser refuses NUL and the others (the call would fail instead of answering).
_CONTROL = {code: " " for code in (*range(32), 127) if code != 9}


def _header_lines(headers: Mapping[str, str]) -> list[str]:
    return [f"{k}: {v.translate(_CONTROL)}" for k, v in headers.items()]


def http_response(decision: Decision, head_only: bool = False, last: bool = False) -> bytes:
    """The answer to Envoy: 200 with the headers to pass on, or the denial itself; `head_only`
    for a HEAD request, whose answer has no body; `last` when the connection closes after it."""
    if decision.allowed:
        # Envoy sorts them by name (the bootstrap's patterns): x-pe-* go upstream, x-ratelimit-*
        # to the client, pe_* into the metadata. Client x-pe-* headers the decision does not
        # set were stripped before ext_authz, where the gRPC answer names them to remove.
        headers = {**decision.upstream_headers, **decision.response_headers}
        headers.update((key, str(value)) for key, value in decision.dynamic_metadata.items())
        status, body = 200, b""
    else:
        headers = {"content-type": "application/json", "x-pe-reason": decision.reason}
        headers.update(decision.response_headers)
        status, body = wire_status(decision.status), (decision.body or "").encode()
    if head_only:
        body = b""
    lines = [f"HTTP/1.1 {status} {_phrase(status)}", *_header_lines(headers), f"content-length: {len(body)}"]
    if last:
        lines.append("connection: close")
    # UTF-8 header values as the gRPC answer carries them (Envoy passes the bytes on).
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a carrier (DENIAL_CARRIERS) or a policy's own status
        return "Status"


def _plain_error(status: int, message: str) -> bytes:
    body = message.encode()
    head = f"HTTP/1.1 {status} {_phrase(status)}\r\ncontent-type: text/plain\r\n"
    return (head + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class HttpAuthorization(asyncio.Protocol):
    """One connection from Envoy: HTTP/1.1 with keep-alive, bodies framed by Content-Length,
    one request at a time (Envoy's connection pool does not pipeline)."""

    def __init__(self, service: AuthorizationService, max_body: int, connections: _Connections) -> None:
        self._service = service
        self._max_body = max_body
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._draining = False
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.open.add(self)
        if self._connections.draining:
            # Accepted just before the drain began: Envoy opened it to send a request, which is
            # answered (with connection: close) if it comes soon; else the connection closes.
            self._draining = True
            asyncio.get_running_loop().call_later(LATE_REQUEST_WAIT_S, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._connections.open.discard(self)

    def drain(self) -> None:
        """Answer the request under way (being decided, or still arriving), if any, with
        `connection: close`, then close; close an idle connection now."""
        self._draining = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self._busy and not self._buffer and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        if not self._busy:
            self._next()

    def _next(self) -> None:
        try:
            self._read_request()
        except Exception:  # a defined answer rather than a connection left hanging
            log.exception("a malformed HTTP authorization request")
            self._busy = False
            self._fail(400, "malformed request")

    def _read_request(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._fail(431, "request header fields too large")
            return
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        if len(parts) != 3:
            self._fail(400, "malformed request line")
            return
        headers: dict[str, str] = {}
        lengths = []
        transfer_encoding = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                lengths.append(value.strip())
            elif name == "transfer-encoding":
                transfer_encoding = True
            elif len(headers) < MAX_HEADERS or name in _ENVOY_HEADERS or name == PARTIAL_BODY_HEADER:
                # Header bytes are UTF-8 on the wire as Envoy forwards them. The cap is on the
                # client's headers: Envoy's own (the peer, the body's real length) come last.
                headers[name] = value.strip().encode("latin-1").decode("utf-8", "replace")
        if transfer_encoding:
            # Envoy frames what it sends here with content-length. Any transfer coding, in any
            # spelling, could frame the body differently here and in a proxy in front.
            self._fail(501, "transfer-encoding is not supported: send a content-length")
            return
        # One plain decimal length or none: anything else could frame requests differently
        # here and in a proxy in front.
        if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
            self._fail(400, "malformed content-length")
            return
        length = int(lengths[0]) if lengths else 0
        if length > MAX_BODY_BYTES:
            self._fail(413, "request body too large")
            return
        if len(self._buffer) < end + 4 + length:
            return  # the rest of the body is on its way
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        self._busy = True
        start = time.perf_counter()
        attrs = request_attributes(parts[0], parts[1], headers, body, self._max_body)
        task = asyncio.ensure_future(self._service.decide(attrs, (), start))
        task.add_done_callback(lambda done: self._answer(done, attrs))

    def _answer(self, done: asyncio.Future[Decision], attrs: RequestAttributes) -> None:
        self._busy = False
        if self._transport is None:
            return
        try:
            response = http_response(done.result(), head_only=attrs.method == "HEAD", last=self._draining)
        except asyncio.CancelledError:  # shutting down: the service is unavailable, not denying
            self._fail(503, "the decision service is shutting down")
            return
        except Exception:  # a defined answer rather than a dropped connection
            log.exception("request %s: the HTTP answer failed", attrs.id)
            # A denial with status 500, as the gRPC Check answers (carried, see DENIAL_CARRIERS).
            self._fail(wire_status(500), "the policy decision failed")
            return
        self._transport.write(response)
        if self._draining:
            self._transport.close()  # after the buffered answer is written
        elif self._buffer:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        if self._transport is not None:
            self._transport.write(_plain_error(status, message))
            self._transport.close()
        self._buffer.clear()


@dataclass
class _Connections:
    open: set[HttpAuthorization] = field(default_factory=set)
    draining: bool = False


class HttpAuthorizationServer:
    """The listening socket and its connections, for a graceful stop."""

    def __init__(self, server: asyncio.Server, connections: _Connections) -> None:
        self.server = server
        self.port = int(server.sockets[0].getsockname()[1])
        self._connections = connections

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let each connection answer the request it is deciding (Envoy's pool
        sees `connection: close` and opens no more), close idle ones; after `grace_s`, drop the
        rest. Envoy keeps pooled connections open, so closing the listener alone would leave
        them taking requests until the process is gone."""
        self.server.close()
        self._connections.draining = True
        for connection in list(self._connections.open):
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # At least one turn: a connection accepted just before close() is set up on a later one.
        await asyncio.sleep(0.01)
        while self._connections.open and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections.open):
            connection.abort()


async def serve_http(
    service: AuthorizationService, host: str, port: int, max_body: int, reuse_port: bool
) -> HttpAuthorizationServer:
    """Listen for Envoy's HTTP authorization requests; the caller drains the server."""
    loop = asyncio.get_running_loop()
    connections = _Connections()

    def protocol() -> HttpAuthorization:
        return HttpAuthorization(service, max_body, connections)

    if host == "::":
        # Both stacks, as gRPC binds "[::]" (asyncio would bind "::" for IPv6 only).
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        except OSError:
            sock.close()
            raise
        server = await loop.create_server(protocol, sock=sock)
    else:
        server = await loop.create_server(protocol, host, port, reuse_port=reuse_port or None)
    return HttpAuthorizationServer(server, connections)
