"""The Envoy configuration that puts policy-engine in front of model backends.

One source for every place that runs Envoy with the service (end-to-end tests, the demo,
`policy-engine envoy-config`): ext_authz with the request body and `clear_route_cache`, the
token-usage extraction, the access log that streams every outcome to the service (telemetry,
and the usage it charges; or the rate-limit filter that charges it, `charging="rate_limit"`),
and routes that match the `x-pe-route` header the service sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from policy_engine.decide.pipeline import ROUTE_HEADER
from policy_engine.decide.quota import METADATA_KEYS, RATE_LIMIT_HEADERS
from policy_engine.telemetry.access_log import BACKEND_CLUSTER_PREFIX, OPENAI_PROMPT, USAGE_NAMESPACE

POLICY_CLUSTER = "policy-engine"
POLICY_HTTP_CLUSTER = "policy-engine-http"
OTLP_CLUSTER = "otlp-collector"
_HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
RATE_LIMIT_DOMAIN = "policy-engine"
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
# The dynamic metadata that asks the service to charge an access-log entry's usage, set on
# every request by the `charge_mark_filter` (metadata, not an access-log custom tag, because an
# Istio access-log provider cannot add tags but logs all of a request's dynamic metadata).
CHARGE_NAMESPACE = "policy_engine.charge"
CHARGE_KEY = "via"
CHARGE_VALUE = "access_log"
# Usage field of the backend's `usage` object charged against each token kind.
USAGE_FIELDS = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "total_tokens": "total_tokens",
}

# Two ways to read the backend's `usage` into dynamic metadata, where the charge after the
# response finds it (in the access-log entry, or as the rate-limit entries' hits), chosen by
# `GatewayConfig.usage_extraction`:
# - "lua" (the default): the script below scans JSON bodies and SSE events chunk by chunk,
#   never buffering, so answers of any size are charged; it adds prompt and completion when a
#   backend reports no total;
# - "native": Envoy's own json_to_metadata (JSON answers) and sse_to_metadata (streamed answers;
#   Envoy 1.38 and later), less Envoy CPU per request (docs/BENCHMARKS.md). json_to_metadata
#   holds every JSON answer until it is complete, so one larger than Envoy's buffer limit (1 MiB
#   by default: long completions, image generations in b64_json, large embedding batches) fails
#   with 500 instead of passing uncharged. They cannot add, so the service adds up what they
#   store when it charges from the access log (`reported_usage`).
UsageExtraction = Literal["native", "lua"]
# How the usage is charged after the response (`GatewayConfig.charging`).
ChargingPath = Literal["access_log", "rate_limit"]
# Any spelling of the JSON media type, parameters included (the filter's plain list is exact).
USAGE_JSON_TYPE = r"(?i)application/json\s*(;.*)?"
# The largest SSE event the native reader parses; a larger one is skipped (Envoy's default 8 KiB
# would drop a usage chunk that carries logprobs).
USAGE_SSE_EVENT_LIMIT = 1 << 20
USAGE_LUA = r"""
-- Bytes kept across chunk boundaries, so a usage object split between two chunks is found.
local TAIL = 4096

local function count(usage, name)
  return tonumber(usage:match('"' .. name .. '"%s*:%s*(%d+)'))
end

local function read(usage)
  -- OpenAI's names, or Anthropic's Messages and OpenAI's Responses APIs' input_tokens and
  -- output_tokens. Anthropic's input_tokens leaves out the cached part of the prompt, which
  -- OpenAI's prompt_tokens includes: add it, so both count every prompt token processed.
  local prompt = count(usage, "prompt_tokens")
  local input = count(usage, "input_tokens")
  if not prompt and input then
    prompt = input + (count(usage, "cache_creation_input_tokens") or 0)
      + (count(usage, "cache_read_input_tokens") or 0)
  end
  local completion = count(usage, "completion_tokens") or count(usage, "output_tokens")
  return prompt, completion, count(usage, "total_tokens")
end

local function extract(buffer, events, prompt, completion, total)
  -- A forward scan over every "usage": {...} object: a pattern starting with ".*" is retried
  -- from every position of a chunk, quadratic in its size (seconds for a 1 MB answer).
  -- A JSON answer: its last "usage" alone (earlier ones may be the model's own output, as the
  -- raw JSON input of an Anthropic tool call). A stream (`events`): field by field, a
  -- later value replacing an earlier one, since OpenAI streams say "usage": null until the
  -- final chunk and Anthropic's reports the input in message_start and the output so far in
  -- each message_delta; a total is never carried over from another event.
  local from = 1
  while true do
    local _, stop = buffer:find('"usage"%s*:%s*', from)
    if not stop then break end
    local usage = buffer:match('^%b{}', stop + 1)
    local p, c, t
    if usage then p, c, t = read(usage) end
    if not events then
      -- Whatever the last "usage" says, even null (or an object cut by the buffer's end, which
      -- the next buffer, starting with the tail, reads whole).
      prompt, completion, total = p, c, t
    elseif p or c or t then
      prompt, completion, total = p or prompt, c or completion, t
    end
    from = stop + 1
  end
  return prompt, completion, total
end

function envoy_on_response(handle)
  local content_type = (handle:headers():get("content-type") or ""):lower()
  local events = content_type:find("text/event-stream", 1, true) ~= nil
  local first = true
  local tail = ""
  local prompt, completion, total
  -- bodyChunks() streams: each chunk goes on to the client as it arrives, nothing is buffered.
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      -- The tail is scanned again with the next chunk: a usage object read twice gives the
      -- same values, in the same order.
      local buffer = tail .. chunk:getBytes(0, size)
      if first then
        -- A stream served with another content type (or none) still reads as one.
        events = events or buffer:find('^%s*data:') ~= nil or buffer:find('^%s*event:') ~= nil
        first = false
      end
      prompt, completion, total = extract(buffer, events, prompt, completion, total)
      if #buffer > TAIL then tail = buffer:sub(-TAIL) else tail = buffer end
    end
  end
  if total == nil and prompt ~= nil and completion ~= nil then total = prompt + completion end
  local metadata = handle:streamInfo():dynamicMetadata()
  if prompt then metadata:set("policy_engine.usage", "prompt_tokens", prompt) end
  if completion then metadata:set("policy_engine.usage", "completion_tokens", completion) end
  if total then metadata:set("policy_engine.usage", "total_tokens", total) end
end
"""


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int


@dataclass(frozen=True)
class GatewayConfig:
    listen_port: int = 10000
    listen_address: str = "127.0.0.1"
    admin_port: int = 9901
    admin_address: str = "127.0.0.1"
    policy: Upstream = Upstream("127.0.0.1", 9001)
    # More replicas of the service, load-balanced with `policy` (they share counters in Redis).
    policy_replicas: tuple[Upstream, ...] = ()
    backends: Mapping[str, Upstream] = field(default_factory=dict)
    authz_timeout_s: float = 1.0
    max_request_bytes: int = 1_048_576
    upstream_timeout_s: float = 120.0
    failure_mode_allow: bool = False
    access_log_flush_s: float = 0.2
    # OTLP/gRPC collector for Envoy's own spans (every request sampled); None = no tracing.
    otlp_endpoint: Upstream | None = None
    tracing_service_name: str = "policy-gateway"
    # "http": ext_authz over Envoy's HTTP protocol to `policy_http` (the service's --http-port);
    # the rate-limit service and the access log stay on gRPC (`policy`).
    authz_transport: Literal["grpc", "http"] = "grpc"
    policy_http: Upstream | None = None
    usage_extraction: UsageExtraction = "lua"
    # How the usage is charged after the response: from the access-log entries the service
    # receives anyway (no call per request, policy_engine.envoy.usage_charge), or by one
    # rate-limit call per response (`apply_on_stream_done`). The mesh's EnvoyFilter offers both
    # (policy_engine.mesh.envoyfilter).
    charging: ChargingPath = "access_log"

    def __post_init__(self) -> None:
        if self.charging not in ("access_log", "rate_limit"):
            raise ValueError(f"charging must be 'access_log' or 'rate_limit', not {self.charging!r}")
        if self.usage_extraction not in ("lua", "native"):
            raise ValueError(f"usage_extraction must be 'lua' or 'native', not {self.usage_extraction!r}")
        if self.authz_transport == "http" and self.policy_http is None:
            raise ValueError("the http ext_authz transport needs the service's HTTP port (policy_http)")


def _cluster(
    name: str, upstream: Upstream, http2: bool = False, replicas: tuple[Upstream, ...] = ()
) -> dict[str, Any]:
    hosts = (upstream, *replicas)
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": host.host, "port_value": host.port}}}}
        for host in hosts
    ]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all(h.host.replace(".", "").isdigit() for h in hosts) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def grpc_access_log(config: GatewayConfig) -> dict[str, Any]:
    """Every request's outcome streamed to the service: the live telemetry of the backends."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "policy-engine",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": POLICY_CLUSTER}},
                "buffer_flush_interval": f"{config.access_log_flush_s}s",
            },
            # Lets the service tell streamed answers (time to first token) from JSON ones.
            "additional_response_headers_to_log": ["content-type"],
        },
    }


def _token_rate_limits() -> list[dict[str, Any]]:
    """Per token kind: after the response, the counters from Check's metadata, hits = usage."""
    entries = []
    for kind, key in METADATA_KEYS.items():
        entries.append(
            {
                "actions": [
                    {
                        "metadata": {
                            "descriptor_key": key,
                            "metadata_key": {"key": AUTHZ_NAMESPACE, "path": [{"key": key}]},
                            "source": "DYNAMIC",
                            "skip_if_absent": True,
                        }
                    }
                ],
                "hits_addend": {"format": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:{USAGE_FIELDS[kind]})%"},
                "apply_on_stream_done": True,
            }
        )
    return entries


def _tracing(config: GatewayConfig) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: its spans go to the collector, and the ext_authz Check
    carries their context (`traceparent`), so the service's decision span joins the trace."""
    return {
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": config.tracing_service_name,
            },
        },
    }


# In the HTTP transport the answer's headers are sorted by name: what goes upstream, to the
# client (on success and on denial) and into the filter's metadata (token-charging keys).
_HTTP_AUTHZ_RESPONSE = {
    "allowed_upstream_headers": {"patterns": [{"prefix": "x-pe-"}]},
    "allowed_client_headers_on_success": {"patterns": [{"prefix": "x-ratelimit-"}]},
    "allowed_client_headers": {
        "patterns": [
            {"exact": "content-type"},
            {"exact": "retry-after"},
            {"exact": "retry-after-ms"},
            {"exact": "x-should-retry"},
            {"prefix": "x-ratelimit-"},
            {"prefix": "x-pe-"},
        ]
    },
    "dynamic_metadata_from_headers": {"patterns": [{"prefix": "pe_"}]},
}

# Before ext_authz in the HTTP transport: a client never sends x-pe-* headers upstream (the
# gRPC answer lists them to remove; an HTTP answer can only add).
SERVICE_HEADER_PREFIX = "x-pe-"


def _http_service(config: GatewayConfig) -> dict[str, Any]:
    from policy_engine.envoy.http_authz import (
        CONTENT_LENGTH,
        DESTINATION_ADDRESS,
        SOURCE_ADDRESS,
        SOURCE_PRINCIPAL,
    )

    assert config.policy_http is not None
    upstream = config.policy_http
    return {
        "server_uri": {
            "uri": f"http://{upstream.host}:{upstream.port}",
            "cluster": POLICY_HTTP_CLUSTER,
            "timeout": f"{config.authz_timeout_s}s",
        },
        "authorization_request": {
            "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
            "headers_to_add": [
                {"key": SOURCE_ADDRESS, "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"},
                {"key": SOURCE_PRINCIPAL, "value": "%DOWNSTREAM_PEER_URI_SAN%"},
                {"key": DESTINATION_ADDRESS, "value": "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"},
                {"key": CONTENT_LENGTH, "value": "%REQ(content-length)%"},
            ],
        },
        "authorization_response": _HTTP_AUTHZ_RESPONSE,
    }


def _denial_status_mappers() -> dict[str, Any]:
    """Turns the HTTP transport's carrier statuses back into the 5xx denials they carry; the
    denial's body and headers are kept (policy_engine.envoy.http_authz.DENIAL_CARRIERS)."""
    from policy_engine.envoy.http_authz import DENIAL_CARRIERS

    return {
        "mappers": [
            {
                "filter": {
                    "status_code_filter": {
                        "comparison": {
                            "op": "EQ",
                            "value": {
                                "default_value": carrier,
                                "runtime_key": f"pe.denial_carrier_{carrier}",
                            },
                        }
                    }
                },
                "status_code": status,
            }
            for status, carrier in sorted(DENIAL_CARRIERS.items())
        ]
    }


def ext_authz_filter(config: GatewayConfig, cluster: str = POLICY_CLUSTER) -> dict[str, Any]:
    """The Check call: request body included, routes recomputed from the headers the service adds."""
    service: dict[str, Any]
    if config.authz_transport == "http":
        service = {"http_service": _http_service(config)}
    else:
        service = {
            "transport_api_version": "V3",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster},
                "timeout": f"{config.authz_timeout_s}s",
            },
        }
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            **service,
            "with_request_body": {
                "max_request_bytes": config.max_request_bytes,
                "allow_partial_message": True,
                "pack_as_bytes": True,
            },
            "clear_route_cache": True,
            "failure_mode_allow": config.failure_mode_allow,
            # A service outage answers 503, distinguishable from a policy denial (403).
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def ratelimit_filter(cluster: str = POLICY_CLUSTER) -> dict[str, Any]:
    """Token charging: the entries run when the stream is done, with the usage the Lua filter found."""
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": RATE_LIMIT_DOMAIN,
            "failure_mode_deny": False,
            "timeout": "1s",
            "rate_limits": _token_rate_limits(),
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            },
        },
    }


def charge_mark_filter() -> dict[str, Any]:
    """Marks each request for charging from its access-log entry (`CHARGE_NAMESPACE`): the
    service charges only marked entries, so an Envoy charging through the rate-limit service,
    which has no such filter, is never charged twice."""
    return {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": CHARGE_NAMESPACE, "value": {CHARGE_KEY: CHARGE_VALUE}}],
        },
    }


def charging_filter(charging: ChargingPath, cluster: str = POLICY_CLUSTER) -> dict[str, Any]:
    """The filter that makes the usage charged after the response, one way or the other."""
    return ratelimit_filter(cluster) if charging == "rate_limit" else charge_mark_filter()


def _lua_filter(source: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source},
        },
    }


_JSON_PARSER_TYPE = "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser"


def _usage_rule(path: tuple[str, ...], key: str) -> dict[str, Any]:
    """The number at `path` → policy_engine.usage:<key>; absent or null: nothing."""
    return {
        "selectors": [{"key": step} for step in path],
        "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": key, "type": "NUMBER"},
    }


# Where the native readers find each usage field: OpenAI's chat and completions
# (`usage.prompt_tokens`), Anthropic's Messages and OpenAI's Responses APIs
# (`usage.input_tokens`), Anthropic's stream (the input in message_start's `message.usage`, the
# output in message_delta's `usage`, or message_start's 1 when the stream ended before any) and
# the Responses stream (`response.usage` when completed). A field absent from an answer writes
# nothing, so the names of one API never clear another's. These filters cannot add:
# `prompt_tokens` gets `input_tokens` alone (or OpenAI's `prompt_tokens`), which is what a
# rate-limit charge reads; the parts of an Anthropic-style prompt (PROMPT_PARTS) and OpenAI's
# figure (OPENAI_PROMPT, which the Lua reader prefers when an answer has both names) are stored
# apart, for the service to combine as the Lua reader does when it charges from the access log
# (`reported_usage`), where it also adds a missing total.
_INPUT_PATHS = (("usage",), ("message", "usage"), ("response", "usage"))
_ANTHROPIC_PATHS = _INPUT_PATHS[:2]  # Responses' input_tokens includes its cached tokens
_NATIVE_USAGE_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "prompt_tokens": (*((*path, "input_tokens") for path in _INPUT_PATHS), ("usage", "prompt_tokens")),
    "completion_tokens": (
        ("message", "usage", "output_tokens"),
        ("usage", "output_tokens"),
        ("response", "usage", "output_tokens"),
        ("usage", "completion_tokens"),
    ),
    "total_tokens": (("usage", "total_tokens"), ("response", "usage", "total_tokens")),
    OPENAI_PROMPT: (("usage", "prompt_tokens"),),
    "input_tokens": tuple((*path, "input_tokens") for path in _INPUT_PATHS),
    "cache_creation_input_tokens": tuple((*path, "cache_creation_input_tokens") for path in _ANTHROPIC_PATHS),
    "cache_read_input_tokens": tuple((*path, "cache_read_input_tokens") for path in _ANTHROPIC_PATHS),
}


def _native_usage_rules() -> list[dict[str, Any]]:
    return [_usage_rule(path, key) for key, paths in _NATIVE_USAGE_PATHS.items() for path in paths]


def usage_filters(extraction: UsageExtraction = "lua") -> list[dict[str, Any]]:
    """The filters that store the backend's reported token usage as dynamic metadata."""
    if extraction == "lua":
        return [_lua_filter(USAGE_LUA)]
    json_filter = {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "response_rules": {
                "rules": _native_usage_rules(),
                "allow_content_types_regex": {"regex": USAGE_JSON_TYPE},
            },
        },
    }
    # Every event is parsed; a later usage object overwrites an earlier one, and the chunks'
    # `"usage": null` writes nothing, so the final usage chunk is what is charged.
    sse_filter = {
        "name": "envoy.filters.http.sse_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
            "response_rules": {
                "content_parser": {
                    "name": "envoy.content_parsers.json",
                    "typed_config": {
                        "@type": _JSON_PARSER_TYPE,
                        "rules": [{"rule": rule} for rule in _native_usage_rules()],
                    },
                },
                "max_event_size": USAGE_SSE_EVENT_LIMIT,
            },
        },
    }
    return [json_filter, sse_filter]


def strip_filter() -> dict[str, Any]:
    """Removes every client header named x-pe-* (HTTP transport only), natively."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [{"remove_on_match": {"key_matcher": {"prefix": SERVICE_HEADER_PREFIX}}}]
            },
        },
    }


def gateway_http_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    """The gateway's HTTP filter chain, in order; the mesh's EnvoyFilter inserts the same filters."""
    return [
        *([strip_filter()] if config.authz_transport == "http" else []),
        ext_authz_filter(config),
        charging_filter(config.charging),
        *usage_filters(config.usage_extraction),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def bootstrap(config: GatewayConfig) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            # The route name lets the access log attribute a request that found no healthy host.
            "name": f"{BACKEND_CLUSTER_PREFIX}{name}",
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": name}}]},
            "route": {
                "cluster": f"{BACKEND_CLUSTER_PREFIX}{name}",
                "timeout": f"{config.upstream_timeout_s}s",
            },
            # A compressed answer would hide its usage from the usage reader: never charged.
            "request_headers_to_remove": ["accept-encoding"],
            # Before ext_authz adds the service's: one value each, the tenant's.
            "response_headers_to_remove": list(RATE_LIMIT_HEADERS),
        }
        for name in sorted(config.backends)
    ]
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {
                    "inline_string": '{"error": {"message": "no route for this request", '
                    '"type": "invalid_request_error", "param": null, "code": "no_route"}}'
                },
            },
        }
    )
    http_filters = gateway_http_filters(config)
    manager: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": "gateway",
        # The service and the backends see one path: /v1//chat%2Fcompletions is a chat
        # request to the backend (its server decodes it), so it must be one to the policies.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "route_config": {
            "name": "models",
            "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
        "access_log": [grpc_access_log(config)],
    }
    if config.authz_transport == "http":
        manager["local_reply_config"] = _denial_status_mappers()
    if config.otlp_endpoint is not None:
        manager["tracing"] = _tracing(config)
    listener = {
        "name": "gateway",
        "address": {"socket_address": {"address": config.listen_address, "port_value": config.listen_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    clusters = [_cluster(POLICY_CLUSTER, config.policy, http2=True, replicas=config.policy_replicas)]
    clusters += [
        _cluster(f"{BACKEND_CLUSTER_PREFIX}{name}", upstream)
        for name, upstream in sorted(config.backends.items())
    ]
    if config.policy_http is not None and config.authz_transport == "http":
        clusters.append(_cluster(POLICY_HTTP_CLUSTER, config.policy_http))
    if config.otlp_endpoint is not None:
        clusters.append(_cluster(OTLP_CLUSTER, config.otlp_endpoint, http2=True))
    return {
        "admin": {
            "address": {"socket_address": {"address": config.admin_address, "port_value": config.admin_port}}
        },
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
