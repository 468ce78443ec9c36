"""The CEL environment policy authors write against: its message types and variables.

This table is the contract with policy authors (DESIGN.md §2): it is turned into protobuf
descriptors so that the CEL type checker rejects `llm.modle` at load time, and it is the
source of the variable reference in docs/policy-language.md. Extend it; never rename a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, timestamp_pb2

PACKAGE = "policy_engine.v1"


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # string|int|double|bool|timestamp|dyn|<Message>|list<T>|map<string,T>
    doc: str


@dataclass(frozen=True)
class MessageType:
    name: str
    doc: str
    fields: tuple[Field, ...]


@dataclass(frozen=True)
class Variable:
    name: str
    type: str
    doc: str


MESSAGES: tuple[MessageType, ...] = (
    MessageType(
        "Request",
        "The HTTP request as Envoy saw it.",
        (
            Field("id", "string", "x-request-id (or Envoy's request id)."),
            Field("method", "string", "HTTP method, upper case."),
            Field("path", "string", "Path without the query string."),
            Field("host", "string", "Host / :authority."),
            Field("scheme", "string", "http or https."),
            Field("protocol", "string", "HTTP/1.1, HTTP/2, ..."),
            Field("headers", "map<string,string>", "Headers with lower-case names; secrets included."),
            Field("query", "map<string,string>", "Query parameters (last value wins)."),
            Field("body", "dyn", "The JSON body parsed (null when absent, not JSON or truncated)."),
            Field("size", "int", "Body size in bytes as announced by the client."),
            Field("body_truncated", "bool", "True when Envoy sent only part of the body."),
            Field("time", "timestamp", "When Envoy received the request."),
        ),
    ),
    MessageType(
        "ChatMessage",
        "One message of a chat request.",
        (
            Field("role", "string", "system, user, assistant or tool."),
            Field("content", "string", "Text content (text parts of multi-part content joined)."),
        ),
    ),
    MessageType(
        "Llm",
        "What the request asks of a model, read from the OpenAI-compatible path and body.",
        (
            Field("model", "string", "Requested model ('' when absent)."),
            Field("kind", "string", "chat, completion, embedding, image, audio or other."),
            Field("stream", "bool", "Streaming response requested."),
            Field(
                "max_tokens",
                "int",
                "The largest of max_tokens, max_completion_tokens and max_output_tokens, numbers given "
                "as strings included (0 when absent).",
            ),
            Field(
                "choices",
                "int",
                "Completions asked for: the largest of n and best_of (1 when absent); an output "
                "reservation is max_tokens times this.",
            ),
            Field("temperature", "double", "Sampling temperature (0 when absent)."),
            Field("user", "string", "OpenAI 'user' field."),
            Field("messages", "list<ChatMessage>", "Chat messages."),
            Field(
                "prompt",
                "string",
                "All text the model is given, joined: system/instructions, message contents (text "
                "and refusal parts), tool-call arguments, tool names and descriptions, prompt, input.",
            ),
            Field("prompt_tokens", "int", "Estimated prompt tokens (tokens.estimate of prompt)."),
        ),
    ),
    MessageType(
        "Peer",
        "A workload at one end of the connection, from Envoy's attributes (mTLS in a mesh).",
        (
            Field("principal", "string", "SPIFFE ID, e.g. spiffe://cluster.local/ns/a/sa/b."),
            Field("namespace", "string", "Namespace parsed from the SPIFFE ID."),
            Field("service_account", "string", "Service account parsed from the SPIFFE ID."),
            Field("address", "string", "IP address."),
            Field("labels", "map<string,string>", "Workload labels."),
        ),
    ),
    MessageType(
        "Tenant",
        "Who is calling, resolved from the API key (stored hashed) or the mTLS principal.",
        (
            Field("id", "string", "Tenant id ('' when unknown)."),
            Field("tier", "string", "Tier, e.g. free, pro, premium."),
            Field("authenticated", "bool", "A valid key or a known principal was presented."),
            Field("key_id", "string", "Non-secret id of the API key used."),
            Field("credential", "string", "none, api_key, invalid_key or principal."),
            Field("models", "list<string>", "Models the tenant may use (glob patterns allowed)."),
            Field("labels", "map<string,string>", "Free-form labels."),
        ),
    ),
    MessageType(
        "Backend",
        "Live statistics of one model backend.",
        (
            Field("name", "string", "Backend name (the route value)."),
            Field("healthy", "bool", "Passes health checks and is not ejected."),
            Field("stale", "bool", "No fresh telemetry within the staleness bound."),
            Field("age_s", "double", "Seconds since the last telemetry update."),
            Field("latency_p50_ms", "double", "Median request latency."),
            Field("latency_p99_ms", "double", "99th percentile request latency."),
            Field("ttft_p99_ms", "double", "99th percentile time to first token."),
            Field("error_rate", "double", "Fraction of 5xx answers, 0..1."),
            Field("inflight", "int", "Requests in flight."),
            Field("queue_depth", "int", "Requests waiting (vllm:num_requests_waiting)."),
            Field("kv_cache_usage", "double", "KV cache use, 0..1 (vllm:kv_cache_usage_perc)."),
            Field("rps", "double", "Requests per second."),
            Field("tokens_per_s", "double", "Tokens per second."),
            Field("version", "string", "Model or server version."),
            Field("region", "string", "Region or zone."),
            Field("model", "string", "Model served."),
            Field("weight", "int", "Configured weight."),
            Field("labels", "map<string,string>", "Free-form labels."),
        ),
    ),
    MessageType(
        "Telemetry",
        "One consistent snapshot of every backend's statistics, plus aggregates.",
        (
            Field("backends", "map<string,Backend>", "Backends by name."),
            Field("load", "double", "Overall load, 0..1 (in-flight plus queued over capacity)."),
            Field("inflight", "int", "Requests in flight over all backends."),
            Field("queue_depth", "int", "Requests waiting over all backends."),
            Field("healthy_backends", "int", "Backends healthy and not stale."),
        ),
    ),
)

VARIABLES: tuple[Variable, ...] = (
    Variable("request", "Request", "The HTTP request."),
    Variable("llm", "Llm", "The model request read from path and body."),
    Variable("source", "Peer", "The calling workload."),
    Variable("destination", "Peer", "The workload called (Envoy's side)."),
    Variable("tenant", "Tenant", "The resolved tenant."),
    Variable("telemetry", "Telemetry", "Live backend telemetry snapshot."),
    Variable("now", "timestamp", "Decision time."),
    Variable("context", "map<string,string>", "ext_authz context extensions."),
    Variable(
        "canary",
        "map<string,string>",
        "Canary assignments: canary policy name → 'canary' or 'stable'; only in routing routes.",
    ),
)

# Visible only in a route's `score` and `require` expressions.
BACKEND_VARIABLE = Variable("backend", "Backend", "The candidate backend being scored.")

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "int": _F.TYPE_INT64,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
}
_WELL_KNOWN = {"timestamp": ".google.protobuf.Timestamp", "dyn": ".google.protobuf.Value"}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name in _WELL_KNOWN:
        field.type = _F.TYPE_MESSAGE
        field.type_name = _WELL_KNOWN[type_name]
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="policy_engine/v1/env.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto", "google/protobuf/timestamp.proto"],
    )
    for message in MESSAGES:
        proto = fdp.message_type.add(name=message.name)
        for number, field in enumerate(message.fields, start=1):
            out = proto.field.add(name=field.name, number=number, label=_F.LABEL_OPTIONAL)
            if field.type.startswith("list<"):
                out.label = _F.LABEL_REPEATED
                _set_type(out, field.type[5:-1])
            elif field.type.startswith("map<string,"):
                entry = proto.nested_type.add(name=f"{_camel(field.name)}Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
                value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
                _set_type(value, field.type[len("map<string,") : -1])
                out.label = _F.LABEL_REPEATED
                out.type = _F.TYPE_MESSAGE
                out.type_name = f".{PACKAGE}.{message.name}.{entry.name}"
            else:
                _set_type(out, field.type)
    return fdp


@cache
def descriptor_pool_for_env() -> descriptor_pool.DescriptorPool:
    """A private pool holding the environment's message types (built once per process)."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in (struct_pb2, timestamp_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.Add(_file_descriptor())
    return pool


def full_name(type_name: str) -> str:
    return f"{PACKAGE}.{type_name}"
