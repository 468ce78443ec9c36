"""Envoy's gRPC access-log stream (`AccessLogService/StreamAccessLogs`) as telemetry.

Each `HTTPAccessLogEntry` of a request Envoy routed to a backend cluster becomes one
`RequestObservation`. What is read from the entry (`AccessLogCommon` unless noted):

* backend: from `upstream_cluster` (`backend-<name>` in the project's bootstrap; the subset of
  Istio's `outbound|PORT|SUBSET|HOST`) or, when that names no backend the hub knows, from
  `route_name` (`backend-<name>`, or a VirtualService route named after its backend). Envoy sets
  `upstream_cluster` only when it picked a host, so without one (`no_healthy_upstream`) the
  route's name is all there is. Entries that name no backend are ignored, and backends the hub
  does not know are counted (`backend_name`).
* status: `response.response_code`.
* latency: `time_to_last_upstream_rx_byte - time_to_first_upstream_tx_byte`, the time the backend
  had the request. The downstream total (`time_to_last_downstream_tx_byte`, else `duration`)
  would add the policy decision and slow clients; it stands in only where the upstream end is
  missing (a timeout, a client that gave up).
* TTFT proxy: `time_to_first_upstream_rx_byte - time_to_first_upstream_tx_byte`. For a JSON answer
  the first byte arrives with the whole response, so when the response's `content-type` is logged
  (`additional_response_headers_to_log`) only `text/event-stream` answers count.
* connect failure: response flags `upstream_connection_failure`, `upstream_connection_termination`,
  `upstream_remote_reset`, `no_healthy_upstream`.
* tokens: dynamic metadata `policy_engine.usage` (`prompt_tokens`, `completion_tokens`,
  `total_tokens`; with Envoy's native readers also the parts of an Anthropic-style prompt, see
  `reported_usage`), set by the bootstrap's usage reader; Envoy's gRPC logger sends the
  request's dynamic metadata in `metadata` by default.

Entries that never reached a backend are ignored: Envoy's local replies (an ext_authz denial, a
rate-limit 429, a shed request) may still name the route's cluster, and counting them would make a
backend look fast and busy. An entry counts when an upstream was tried: an upstream address or a
first upstream byte sent, an attempt count, or a connect-failure/timeout flag. Intermediate
(periodic) entries of long streams are ignored; only the final entry describes the outcome.

A message that cannot be decoded, or an entry that cannot be read, is counted and skipped: the
stream never fails because of its content. Register with `add_to_server` (not the generated
helper) so that decoding happens here, per message, instead of failing the whole stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.observations import RequestObservation

log = logging.getLogger("policy_engine.telemetry.access_log")

METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
# Message batches whose charges may be under way at once (Envoy sends one per flush interval per
# worker thread, so this is minutes of backlog before anything is dropped).
MAX_CHARGING_BATCHES = 1024
# Entries read or charged between two turns of the event loop (and charged in one call to the
# counter store: one Redis round trip per tenant). A message holds a flush interval's entries
# (~20 at Envoy's default 16 KiB buffer, ~50 µs each to read and charge); handled in one go it
# would hold up every decision arriving meanwhile by a millisecond or more.
ENTRIES_PER_TURN = 4
# Shared with the bootstrap that writes them (policy_engine.envoy.bootstrap): the usage readers'
# metadata namespace, and the prefix of the clusters that are backends.
USAGE_NAMESPACE = "policy_engine.usage"
BACKEND_CLUSTER_PREFIX = "backend-"
# What Envoy's native usage readers store apart since they cannot add: the parts of an
# Anthropic-style prompt (`input_tokens` leaves out the tokens written to and read from the
# prompt cache), and OpenAI's `prompt_tokens`, which comes first when an answer has both. The
# Lua reader stores the prompt itself, as `prompt_tokens`, and never these keys.
PROMPT_PARTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
OPENAI_PROMPT = "openai_prompt_tokens"
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_CONNECT_FLAGS = (
    "upstream_connection_failure",
    "upstream_connection_termination",
    "upstream_remote_reset",
    "no_healthy_upstream",
)
_FINAL_TYPES = frozenset(
    {
        accesslog_pb2.AccessLogType.NotSet,
        accesslog_pb2.AccessLogType.DownstreamEnd,
        accesslog_pb2.AccessLogType.UpstreamEnd,
    }
)


def _from_cluster(cluster: str) -> str | None:
    if cluster.startswith(BACKEND_CLUSTER_PREFIX) and len(cluster) > len(BACKEND_CLUSTER_PREFIX):
        return cluster[len(BACKEND_CLUSTER_PREFIX) :]
    # Istio's cluster of a service port and subset; an inbound cluster names no subset.
    parts = cluster.split("|")
    if len(parts) == 4 and parts[0] == "outbound" and parts[2]:
        return parts[2]
    return None


def _from_route(route: str) -> str | None:
    name = route.removeprefix(BACKEND_CLUSTER_PREFIX)
    return name or None


def backend_name(cluster: str, route: str, known: Callable[[str], bool] | None = None) -> str | None:
    """The backend an access-log entry is about, or None.

    From the cluster Envoy picked: `backend-NAME` in `envoy-config`'s bootstrap, or, in an Istio
    mesh, `outbound|PORT|SUBSET|HOST`, where the DestinationRule subset names the backend (as in
    mesh/); else from the route's name: `backend-NAME` in the bootstrap, or the VirtualService
    route's name in a mesh (mesh/ names each route after its backend). The cluster is the
    only source when Envoy picked a host (it has none on `no_healthy_upstream`) and a route can
    hold several backends (a weighted canary route). With `known`, the first of the two that it
    knows wins (a backend whose name cannot be a subset name, `llama-3.1-8b`, is found by its
    route), and otherwise the first found: the hub counts names it does not know."""
    names = [name for name in (_from_cluster(cluster), _from_route(route)) if name is not None]
    if known is not None:
        for name in names:
            if known(name):
                return name
    return names[0] if names else None


def _ms(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    duration = getattr(message, name)
    return float(duration.seconds) * 1000.0 + float(duration.nanos) / 1e6


def reported_usage(fields: Any) -> dict[str, float]:
    """`prompt_tokens`, `completion_tokens` and `total_tokens` as the usage metadata's `fields`
    (a Struct's) report them, whichever reader wrote them: only those reported, each a finite
    number of 0 or more.

    What the Lua reader does in Envoy is done here for the native readers: an Anthropic-style
    prompt is its parts added up, and a missing total is prompt plus completion."""

    def number(key: str) -> float | None:
        if key not in fields or fields[key].WhichOneof("kind") != "number_value":
            return None
        value: float = fields[key].number_value
        return value if 0 <= value < math.inf else None  # NaN fails this too

    usage = {key: value for key in USAGE_KEYS if (value := number(key)) is not None}
    parts = [number(key) for key in PROMPT_PARTS]
    openai = number(OPENAI_PROMPT)
    if openai is not None:
        usage["prompt_tokens"] = openai
    elif parts[0] is not None:
        usage["prompt_tokens"] = sum(part for part in parts if part is not None)
    if "total_tokens" not in usage and "prompt_tokens" in usage and "completion_tokens" in usage:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def _tokens(common: Any) -> tuple[int, int, int]:
    namespaces = common.metadata.filter_metadata
    if USAGE_NAMESPACE not in namespaces:
        return 0, 0, 0
    usage = reported_usage(namespaces[USAGE_NAMESPACE].fields)

    def count(key: str) -> int:
        value = usage.get(key, 0.0)
        return int(value) if value < 2**53 else 0

    return count("prompt_tokens"), count("completion_tokens"), count("total_tokens")


BackendOf = Callable[[str, str], str | None]


def parse_entry(entry: Any, backend_of: BackendOf = backend_name) -> RequestObservation | None:
    """One `HTTPAccessLogEntry` → an observation, or None if it says nothing about a backend."""
    common = entry.common_properties
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
        return None
    backend = backend_of(common.upstream_cluster, common.route_name)
    if backend is None:
        return None
    flags = common.response_flags
    connect_failure = any(getattr(flags, flag) for flag in _CONNECT_FLAGS)
    attempted = (
        connect_failure
        or flags.upstream_request_timeout
        or common.HasField("upstream_remote_address")
        or common.HasField("time_to_first_upstream_tx_byte")
        or common.upstream_request_attempt_count > 0
    )
    if not attempted:
        return None
    response = entry.response
    status = int(response.response_code.value) if response.HasField("response_code") else 0
    sent = _ms(common, "time_to_first_upstream_tx_byte") or 0.0
    latency: float | None = None
    ttft: float | None = None
    if not connect_failure:
        end = _ms(common, "time_to_last_upstream_rx_byte")
        if end is None:
            end = _ms(common, "time_to_last_downstream_tx_byte") or _ms(common, "duration")
        if end is not None and end >= sent:
            latency = end - sent
        first = _ms(common, "time_to_first_upstream_rx_byte")
        content_type = response.response_headers.get("content-type")
        streamed = content_type is None or content_type.startswith("text/event-stream")
        if first is not None and first >= sent and streamed:
            ttft = first - sent
    prompt, completion, total = _tokens(common)
    return RequestObservation(
        backend=backend,
        status=status,
        latency_ms=latency,
        ttft_ms=ttft,
        connect_failure=connect_failure,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
    )


@dataclass
class IngestCounters:
    messages: int = 0
    entries: int = 0
    observed: int = 0
    ignored: int = 0  # local replies, intermediate entries, clusters that are not backends
    unknown_backend: int = 0
    malformed: int = 0  # undecodable messages and unreadable entries
    streams: int = 0
    charged: int = 0  # token counters charged from entries
    charge_errors: int = 0  # entries whose charge failed (a store that refuses is counted there)
    charges_dropped: int = 0  # entries not charged because too many batches were under way


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Feeds the hub from Envoy's `envoy.access_loggers.http_grpc` streams."""

    def __init__(
        self,
        hub: TelemetryHub,
        backend_of: BackendOf | None = None,
        charge: Callable[[Sequence[Any]], Awaitable[int]] | None = None,
    ) -> None:
        """`charge`: called with the `AccessLogCommon`s of up to ENTRIES_PER_TURN entries at a
        time, after the telemetry took them (token usage charged from the log,
        policy_engine.envoy.usage_charge); a failure counts all of them as failed."""
        self._hub = hub
        self._backend_of = backend_of or partial(backend_name, known=hub.knows)
        self._charge = charge
        self._charging: set[asyncio.Future[None]] = set()
        self.counters = IngestCounters()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register with raw-bytes requests, so one bad message cannot end the stream."""
        handler: grpc.RpcMethodHandler[Any, Any] = grpc.stream_unary_rpc_method_handler(
            self.StreamAccessLogs,
            request_deserializer=None,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
        )
        service = grpc.method_handlers_generic_handler(
            "envoy.service.accesslog.v3.AccessLogService", {"StreamAccessLogs": handler}
        )
        server.add_generic_rpc_handlers((service,))

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        self.counters.streams += 1
        async for message in request_iterator:
            entries = self._entries(message)
            # Charging starts before the first wait below: a stream cancelled there (Envoy
            # resets it, or shutdown) must not lose the message's charges with it.
            if self._charge is not None and entries:
                self._start_charging(entries)
            for first in range(0, len(entries), ENTRIES_PER_TURN):
                if first:
                    await asyncio.sleep(0)
                self._observe(entries[first : first + ENTRIES_PER_TURN])
        # Envoy keeps the stream open for good; an answer only comes when it closes the stream.
        return als_pb2.StreamAccessLogsResponse()

    def _start_charging(self, entries: list[Any]) -> None:
        # Charges run beside the stream, not in it: a slow counter store (Redis timing out)
        # must not hold up reading the log, or Envoy would drop entries and the telemetry with
        # them. Past the bound, a batch is dropped and counted rather than queued without end.
        if len(self._charging) >= MAX_CHARGING_BATCHES:
            self.counters.charges_dropped += len(entries)
            log.warning("token charges of %d access-log entries dropped: the store is behind", len(entries))
            return
        task = asyncio.ensure_future(self._charge_all(entries))
        self._charging.add(task)
        task.add_done_callback(self._charging.discard)

    async def _charge_all(self, entries: list[Any]) -> None:
        assert self._charge is not None
        for first in range(0, len(entries), ENTRIES_PER_TURN):
            if first:
                await asyncio.sleep(0)  # an in-memory store's charge never suspends
            chunk = entries[first : first + ENTRIES_PER_TURN]
            try:
                # Awaited first: `counters.charged += await ...` would read the count before the
                # await and lose the charges of batches finishing meanwhile.
                charged = await self._charge([entry.common_properties for entry in chunk])
            except Exception:  # a failing slice must not end the stream and its later charges
                self.counters.charge_errors += len(chunk)
                log.warning("charging %d access-log entries failed", len(chunk), exc_info=True)
                continue
            self.counters.charged += charged

    async def drain(self) -> None:
        """Wait for the charges under way (at shutdown, once the streams have ended)."""
        while self._charging:
            await asyncio.gather(*self._charging, return_exceptions=True)

    def ingest(self, message: Any) -> int:
        """One stream message (decoded or raw bytes) → number of observations the hub took."""
        return self._observe(self._entries(message))

    def _entries(self, message: Any) -> list[Any]:
        self.counters.messages += 1
        if isinstance(message, bytes | bytearray | memoryview):
            try:
                message = als_pb2.StreamAccessLogsMessage.FromString(bytes(message))
            except Exception:
                self.counters.malformed += 1
                log.debug("undecodable access-log message of %d bytes", len(message))
                return []
        try:
            return list(message.http_logs.log_entry)
        except Exception:
            self.counters.malformed += 1
            return []

    def _observe(self, entries: list[Any]) -> int:
        taken = 0
        for entry in entries:
            self.counters.entries += 1
            try:
                observation = parse_entry(entry, self._backend_of)
                accepted = observation is not None and self._hub.observe(observation)
            except Exception:
                self.counters.malformed += 1
                log.debug("unreadable access-log entry", exc_info=True)
                continue
            if observation is None:
                self.counters.ignored += 1
            elif accepted:
                self.counters.observed += 1
                taken += 1
            else:
                self.counters.unknown_backend += 1
        return taken
