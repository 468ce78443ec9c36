"""Envoy ext_authz CheckRequest → attributes, and Decision → CheckResponse.

Every client-supplied `x-pe-*` header is removed or overwritten on the way upstream: the
mesh routes on them, so a client must never choose its own route, canary or tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from policy_engine.decide.attributes import Peer, RequestAttributes
from policy_engine.decide.decision import Decision

PREFIX = "x-pe-"
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MAX_HEADERS = 256  # more are dropped: a request with thousands of headers is not worth parsing


def _peer(peer: attribute_context_pb2.AttributeContext.Peer) -> Peer:
    address = peer.address.socket_address.address if peer.HasField("address") else ""
    return Peer(principal=peer.principal, address=address, labels=dict(peer.labels))


def _headers(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    headers: dict[str, str] = {}
    if http.header_map.headers:  # Envoy's encode_raw_headers: values as bytes
        for header in http.header_map.headers[:MAX_HEADERS]:
            value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
            headers[header.key.lower()] = value
    else:
        for index, (key, value) in enumerate(http.headers.items()):
            if index >= MAX_HEADERS:
                break
            headers[key.lower()] = value
    return headers


def attributes(request: external_auth_pb2.CheckRequest, max_body: int) -> RequestAttributes:
    """What the pipeline decides on; tolerant of every missing field."""
    context = request.attributes
    http = context.request.http
    headers = _headers(http)
    body = http.raw_body if http.raw_body else http.body.encode("utf-8", "surrogateescape")
    truncated = headers.get(PARTIAL_BODY_HEADER) == "true" or len(body) > max_body
    if len(body) > max_body:
        body = body[:max_body]
    time = None
    if context.request.HasField("time"):
        time = context.request.time.ToDatetime(tzinfo=UTC)
    path = http.path or "/"
    if http.query and "?" not in path:
        path = f"{path}?{http.query}"
    return RequestAttributes(
        method=http.method or "GET",
        path=path,
        host=http.host or headers.get(":authority", ""),
        scheme=http.scheme,
        protocol=http.protocol,
        id=http.id or headers.get("x-request-id", ""),
        headers=headers,
        body=body,
        body_truncated=truncated,
        size=http.size if http.size >= 0 else -1,
        time=time or datetime.now(UTC),
        source=_peer(context.source),
        destination=_peer(context.destination),
        context=dict(context.context_extensions),
    )


def _options(headers: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in headers.items()
    ]


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(data)
    return result


def check_response(
    decision: Decision, client_headers: Iterable[str], metadata: Mapping[str, Any] | None = None
) -> external_auth_pb2.CheckResponse:
    """The answer to Envoy: OK with upstream headers and metadata, or the denial as an HTTP response."""
    if decision.allowed:
        ok = external_auth_pb2.OkHttpResponse(
            headers=_options(decision.upstream_headers),
            headers_to_remove=[
                name
                for name in client_headers
                if name.startswith(PREFIX) and name not in decision.upstream_headers
            ],
            response_headers_to_add=_options(decision.response_headers),
        )
        response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
    else:
        headers = {
            "content-type": "application/json",
            "x-pe-reason": decision.reason,
            **decision.response_headers,
        }
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=_options(headers),
            body=decision.body or "",
        )
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=decision.reason),
            denied_response=denied,
        )
    if metadata:
        response.dynamic_metadata.CopyFrom(_struct(metadata))
    return response
