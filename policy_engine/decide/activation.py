"""Attributes → the CEL values of the environment.

Expressions translated to Python (cel/native.py) read plain Python objects with the fields of
the schema's messages: the request's own dataclasses (`LlmRequest`, `Tenant`, `Peer`) and a
`RequestView`. The engine needs protobuf messages (typed messages let its checker reject
unknown fields at load); those cost ~25 µs a request, so they are built only when an
expression the translation does not cover is evaluated. The telemetry message is built once
per snapshot and reused by every decision, by both paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from policy_engine.cel.engine import message_classes
from policy_engine.cel.schema import MESSAGES
from policy_engine.decide.attributes import LlmRequest, Peer, RequestAttributes
from policy_engine.decide.tenants import Tenant
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

_BACKEND_MESSAGE_FIELDS = {
    f.name for m in MESSAGES if m.name == "Backend" for f in m.fields if not f.type.startswith("map<")
}
# The scalar fields the CEL Backend message shares with BackendStats (labels are a map).
_BACKEND_FIELDS = tuple(
    spec.name for spec in dataclasses.fields(BackendStats) if spec.name in _BACKEND_MESSAGE_FIELDS
)


MAX_BODY_DEPTH = 100  # protobuf's parser refuses deeper nesting: both paths read such a body as null


def json_depth(value: Any, limit: int = MAX_BODY_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, counting stops past `limit`."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        nested: list[Any] = []
        for item in level:
            if type(item) is dict:
                nested.extend(v for v in item.values() if type(v) in (dict, list))
            elif type(item) is list:
                nested.extend(v for v in item if type(v) in (dict, list))
        level = nested
    return depth


def json_numbers_as_doubles(value: Any) -> Any:
    """A parsed JSON body as CEL sees it: every number is a double (google.protobuf.Value)."""
    kind = type(value)
    if kind is dict:
        return {k: json_numbers_as_doubles(v) for k, v in value.items()}
    if kind is list:
        return [json_numbers_as_doubles(v) for v in value]
    if kind is int:
        return float(value)  # OverflowError for ints beyond a double: the caller reads null
    return value


class RequestView:
    """The CEL `request` value for translated expressions (fields of the Request message)."""

    # Message-typed fields: `has()` is whether they are set (None: unset), not whether empty.
    _cel_presence = ("body", "time")

    __slots__ = (
        "body",
        "body_truncated",
        "headers",
        "host",
        "id",
        "method",
        "path",
        "protocol",
        "query",
        "scheme",
        "size",
        "time",
    )

    def __init__(self, attrs: RequestAttributes, body: Any, with_body: bool) -> None:
        self.id = attrs.id
        self.method = attrs.method
        self.path = attrs.path_only
        self.host = attrs.host
        self.scheme = attrs.scheme
        self.protocol = attrs.protocol
        self.headers = attrs.headers
        self.query = attrs.query
        self.size = attrs.size if attrs.size >= 0 else len(attrs.body)
        self.body_truncated = attrs.body_truncated
        self.time = attrs.time
        self.body = None
        if with_body and isinstance(body, dict | list) and json_depth(body) <= MAX_BODY_DEPTH:
            try:
                self.body = json_numbers_as_doubles(body)
            except (OverflowError, RecursionError):
                self.body = None  # unrepresentable JSON reads as null, as in the engine


class MessageBuilder:
    def __init__(self) -> None:
        # Callables, not `type[Message]`: the stubs' Message takes no field keywords.
        classes: Mapping[str, Callable[..., Message]] = message_classes()
        self._request = classes["Request"]
        self._llm = classes["Llm"]
        self._chat = classes["ChatMessage"]
        self._peer = classes["Peer"]
        self._tenant = classes["Tenant"]
        self._backend = classes["Backend"]
        self._telemetry = classes["Telemetry"]
        self._cached_snapshot: TelemetrySnapshot | None = None
        self._cached_telemetry: Message | None = None
        self._cached_backends: dict[str, Message] = {}

    def request(self, attrs: RequestAttributes, body: Any, with_body: bool) -> Message:
        message: Any = self._request(
            id=attrs.id,
            method=attrs.method,
            path=attrs.path_only,
            host=attrs.host,
            scheme=attrs.scheme,
            protocol=attrs.protocol,
            headers=attrs.headers,
            query=attrs.query,
            size=attrs.size if attrs.size >= 0 else len(attrs.body),
            body_truncated=attrs.body_truncated,
        )
        if attrs.time is not None:
            message.time.FromDatetime(attrs.time)
        if with_body and isinstance(body, dict | list) and json_depth(body) <= MAX_BODY_DEPTH:
            try:
                if isinstance(body, dict):
                    message.body.struct_value.SetInParent()  # `{}` is a body, not null
                    message.body.struct_value.update(body)
                else:
                    message.body.list_value.SetInParent()
                    message.body.list_value.extend(body)
            except (ValueError, TypeError, OverflowError, RecursionError):
                message.ClearField("body")  # unrepresentable JSON (e.g. huge ints) reads as null
        result: Message = message
        return result

    def llm(self, llm: LlmRequest, with_messages: bool) -> Message:
        return self._llm(
            model=llm.model,
            kind=llm.kind,
            stream=llm.stream,
            max_tokens=llm.max_tokens,
            choices=llm.choices,
            temperature=llm.temperature,
            user=llm.user,
            messages=[self._chat(role=m.role, content=m.content) for m in llm.messages]
            if with_messages
            else (),
            prompt=llm.prompt,
            prompt_tokens=llm.prompt_tokens,
        )

    def peer(self, peer: Peer) -> Message:
        return self._peer(
            principal=peer.principal,
            namespace=peer.namespace,
            service_account=peer.service_account,
            address=peer.address,
            labels=peer.labels,
        )

    def tenant(self, tenant: Tenant) -> Message:
        return self._tenant(
            id=tenant.id,
            tier=tenant.tier,
            authenticated=tenant.authenticated,
            key_id=tenant.key_id,
            credential=tenant.credential,
            models=tenant.models,
            labels=tenant.labels,
        )

    def backend(self, stats: BackendStats) -> Message:
        message: Any = self._backend(**{name: getattr(stats, name) for name in _BACKEND_FIELDS})
        message.labels.update(stats.labels)
        result: Message = message
        return result

    def unknown_backend(self, name: str) -> Message:
        """A backend with no telemetry at all: treated as stale, not as healthy."""
        return self._backend(name=name, healthy=False, stale=True)

    def telemetry(self, snapshot: TelemetrySnapshot) -> tuple[Message, Mapping[str, Message]]:
        if snapshot is self._cached_snapshot and self._cached_telemetry is not None:
            return self._cached_telemetry, self._cached_backends
        backends = {name: self.backend(stats) for name, stats in snapshot.backends.items()}
        usable = [s for s in snapshot.backends.values() if s.healthy and not s.stale]
        message = self._telemetry(
            backends=backends,
            load=snapshot.overall_load(),
            inflight=sum(s.inflight for s in snapshot.backends.values()),
            queue_depth=sum(s.queue_depth for s in snapshot.backends.values()),
            healthy_backends=len(usable),
        )
        self._cached_snapshot, self._cached_telemetry, self._cached_backends = snapshot, message, backends
        return message, backends


def decision_time(attrs: RequestAttributes) -> datetime:
    return attrs.time if attrs.time is not None else datetime.now(UTC)
