"""Do-nothing ext_authz servers in Python: the floors bench/gateway.py measures against.

Run: .venv/bin/python bench/noop_authz.py PORT_FILE [--http] [--route BACKEND] [--busy-us N]

Every request is allowed without any work. The default is a gRPC Authorization service on the
same grpc.aio stack as policy-engine, so Envoy + this server shows what a Python gRPC ext_authz
costs on the machine before any decision is made. With --http it is Envoy's HTTP ext_authz
protocol instead (any request answered 200) on a plain asyncio server: the floor of the other
transport Envoy offers. With --route (HTTP only) every answer also names that backend in
`x-pe-route`, as policy-engine's do, so that an Envoy with the gateway's whole configuration
routes the request: what that configuration costs in Envoy, apart from any decision. With
--busy-us (HTTP only) it spins N µs of CPU before each answer: a stand-in for a decision of that
cost, to see what a service's CPU per request does to the latency. It writes its port to
PORT_FILE and serves until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
)
_HTTP_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        return _OK


class NoopHttpAuthorization(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests framed by Content-Length (what Envoy sends)."""

    def __init__(self, answer: bytes = _HTTP_OK, busy_s: float = 0.0) -> None:
        self._answer = answer
        self._busy_s = busy_s
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self._buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            self._buffer = self._buffer[end + 4 + length :]
            if self._busy_s:
                until = time.perf_counter() + self._busy_s
                while time.perf_counter() < until:
                    pass
            if self._transport is not None:
                self._transport.write(self._answer)


async def serve(port_file: Path, http: bool, route: str | None, busy_us: float) -> None:
    if http:
        answer = _HTTP_OK
        if route:
            answer = f"HTTP/1.1 200 OK\r\nx-pe-route: {route}\r\ncontent-length: 0\r\n\r\n".encode()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: NoopHttpAuthorization(answer, busy_us / 1e6), "127.0.0.1", 0
        )
        port_file.write_text(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()
        return
    grpc_server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    port_file.write_text(str(port))
    await grpc_server.wait_for_termination()


if __name__ == "__main__":
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--http", action="store_true", help="Envoy's HTTP ext_authz protocol instead of gRPC")
    parser.add_argument("--route", help="backend every HTTP answer names in x-pe-route")
    parser.add_argument("--busy-us", type=float, default=0.0, help="µs of CPU spent before each HTTP answer")
    args = parser.parse_args()
    if (args.route or args.busy_us) and not args.http:
        parser.error("--route and --busy-us need --http")
    asyncio.run(serve(args.port_file, args.http, args.route, args.busy_us))
