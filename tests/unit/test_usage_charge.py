"""Token usage charged from access-log entries (the default charging path), and only from
entries marked for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc

from policy_engine.envoy.bootstrap import (
    AUTHZ_NAMESPACE,
    CHARGE_KEY,
    CHARGE_NAMESPACE,
    CHARGE_VALUE,
    usage_filters,
)
from policy_engine.envoy.usage_charge import UsageCharger, usage_charges
from policy_engine.telemetry import access_log
from policy_engine.telemetry.access_log import OPENAI_PROMPT, PROMPT_PARTS, AccessLogService
from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.metrics import TelemetryCollector
from tests.unit.test_telemetry_access_log import FakeClock, entry, message, serve

COUNTERS = json.dumps([["tokens|free|day|total_tokens|acme", 30]])


def mark(common: Any, value: str = CHARGE_VALUE) -> None:
    """What the gateway's set_metadata filter puts in every request's dynamic metadata."""
    common.metadata.filter_metadata[CHARGE_NAMESPACE].update({CHARGE_KEY: value})


def charged_entry(
    usage: dict[str, Any] | None = None, marked: bool = True, counters: dict[str, Any] | None = None
) -> Any:
    log = entry(usage=usage if usage is not None else {"total_tokens": 41})
    common = log.common_properties
    if marked:
        mark(common)
    common.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        counters if counters is not None else {"pe_total_tokens": COUNTERS}
    )
    return log


async def streamed(
    service: AccessLogService, batches: list[Any], stream_ended: Callable[[], None] = lambda: None
) -> None:
    """Stream `batches` through a real grpc.aio server, then wait for the charges under way."""
    server, port = await serve(service)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter(batches), timeout=30)
        stream_ended()
        await service.drain()
    finally:
        await server.stop(None)


def test_a_marked_entry_charges_each_reported_kind() -> None:
    log = charged_entry(
        usage={"prompt_tokens": 11, "completion_tokens": 30, "total_tokens": 41},
        counters={"pe_total_tokens": COUNTERS, "pe_output_tokens": "[]", "pe_input_tokens": "[]"},
    )
    assert sorted(usage_charges(log.common_properties)) == sorted(
        [(COUNTERS, 41, "total_tokens"), ("[]", 30, "output_tokens"), ("[]", 11, "input_tokens")]
    )


def test_the_native_readers_parts_are_added_up_as_the_lua_reader_does() -> None:
    """Envoy's native readers cannot add: for an Anthropic-style answer they store the prompt's
    parts (input_tokens leaves out the cached tokens) and no total; the charge adds them up."""
    counters = {"pe_total_tokens": COUNTERS, "pe_output_tokens": "[]", "pe_input_tokens": "[]"}
    native = {
        "prompt_tokens": 20,  # input_tokens alone, what a rate-limit charge would read
        "input_tokens": 20,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 7,
        "completion_tokens": 9,
    }
    expected = [(COUNTERS, 41, "total_tokens"), ("[]", 9, "output_tokens"), ("[]", 32, "input_tokens")]
    assert sorted(usage_charges(charged_entry(native, counters=counters).common_properties)) == sorted(
        expected
    )
    # What the Lua reader stores for the same answer charges the same.
    lua = {"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 41}
    assert sorted(usage_charges(charged_entry(lua, counters=counters).common_properties)) == sorted(expected)
    # No cached part reported; a reported total stands; no total without both halves.
    assert usage_charges(charged_entry({"input_tokens": 4, "completion_tokens": 3}).common_properties) == [
        (COUNTERS, 7, "total_tokens")
    ]
    assert usage_charges(
        charged_entry({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 9}).common_properties
    ) == [(COUNTERS, 9, "total_tokens")]
    assert usage_charges(charged_entry({"input_tokens": 4}).common_properties) == []
    # An answer with both names: OpenAI's prompt_tokens, as the Lua reader prefers it.
    both = {OPENAI_PROMPT: 12, "prompt_tokens": 12, "input_tokens": 10, "cache_read_input_tokens": 7}
    assert usage_charges(charged_entry({**both, "completion_tokens": 3}).common_properties) == [
        (COUNTERS, 15, "total_tokens")
    ]
    # An unreadable part is left out rather than spoiling the prompt.
    odd = {"input_tokens": 4, "cache_read_input_tokens": float("nan"), "completion_tokens": 3}
    assert usage_charges(charged_entry(odd).common_properties) == [(COUNTERS, 7, "total_tokens")]


def test_the_native_readers_store_every_part_the_charge_adds_up() -> None:
    json_filter, sse_filter = usage_filters("native")
    rules = json_filter["typed_config"]["response_rules"]["rules"]
    stored = {rule["on_present"]["key"] for rule in rules}
    assert set(PROMPT_PARTS) | {OPENAI_PROMPT, "prompt_tokens", "completion_tokens", "total_tokens"} == stored
    sse_rules = sse_filter["typed_config"]["response_rules"]["content_parser"]["typed_config"]["rules"]
    assert [r["rule"] for r in sse_rules] == rules


def test_what_is_not_charged() -> None:
    # Charged through the rate-limit service instead (that Envoy marks nothing).
    assert usage_charges(charged_entry(marked=False).common_properties) == []
    # A mark with another value, or the key in another namespace, is not a mark.
    odd = charged_entry(marked=False)
    mark(odd.common_properties, "rate_limit")
    assert usage_charges(odd.common_properties) == []
    elsewhere = charged_entry(marked=False)
    elsewhere.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update({CHARGE_KEY: CHARGE_VALUE})
    assert usage_charges(elsewhere.common_properties) == []
    # The mark decides when present: the earlier tag beside a mark saying otherwise charges nothing.
    both = charged_entry(marked=False)
    mark(both.common_properties, "rate_limit")
    both.common_properties.custom_tags["pe_charge"] = "access_log"
    assert usage_charges(both.common_properties) == []


def test_an_entry_tagged_the_earlier_way_is_still_charged() -> None:
    """A gateway still running a bootstrap generated before the mark (the logger's custom tag
    `pe_charge: access_log`) keeps being charged while it is upgraded."""
    log = charged_entry(marked=False)
    log.common_properties.custom_tags["pe_charge"] = "access_log"
    assert usage_charges(log.common_properties) == [(COUNTERS, 41, "total_tokens")]
    log.common_properties.custom_tags["pe_charge"] = "rate_limit"
    assert usage_charges(log.common_properties) == []
    # No usage reported (an aborted stream): the reservation stays.
    assert usage_charges(charged_entry(usage={}).common_properties) == []
    # No counters: the decision charged nothing to this request.
    assert usage_charges(charged_entry(counters={}).common_properties) == []
    # Negative, NaN or non-numeric usage, and counters that are not a string.
    for odd in (-5, float("nan"), "41", -0.4):
        assert usage_charges(charged_entry(usage={"total_tokens": odd}).common_properties) == []
    assert usage_charges(charged_entry(counters={"pe_total_tokens": 7}).common_properties) == []
    # A reported 0 is charged: it returns the whole reservation (a filtered or empty answer).
    for zero in (0, 0.4):
        assert usage_charges(charged_entry(usage={"total_tokens": zero}).common_properties) == [
            (COUNTERS, 0, "total_tokens")
        ]
    # Absurd usage is clamped, as on the rate-limit path.
    ((_, tokens, _),) = usage_charges(charged_entry(usage={"total_tokens": 1e30}).common_properties)
    assert tokens == 1 << 32


def test_a_request_that_never_reached_a_backend_returns_its_reservation() -> None:
    def unanswered(flags: tuple[str, ...], sent_ms: float | None = None, attempts: int = 1) -> Any:
        log = entry(status=503, sent_ms=sent_ms, first_rx_ms=None, last_rx_ms=None, flags=flags)
        common = log.common_properties
        common.upstream_request_attempt_count = attempts
        mark(common)
        common.metadata.filter_metadata[AUTHZ_NAMESPACE].update({"pe_total_tokens": COUNTERS})
        return log.common_properties

    returned = [(COUNTERS, 0, "total_tokens")]
    for flags in (
        ("no_healthy_upstream",),
        ("upstream_connection_failure",),
        ("downstream_connection_termination",),
        (),
    ):
        assert usage_charges(unanswered(flags)) == returned, flags
    assert usage_charges(unanswered((), attempts=0)) == returned  # no attempt at all
    # A byte went upstream: the backend may have worked on it, whatever happened next.
    assert usage_charges(unanswered(("upstream_connection_failure",), sent_ms=2.0)) == []
    assert usage_charges(unanswered(("downstream_connection_termination",), sent_ms=2.0)) == []
    # Retried: the timing may be the last attempt's only.
    assert usage_charges(unanswered(("upstream_connection_failure",), attempts=2)) == []


def test_the_stream_charges_marked_entries_and_survives_a_failing_charge() -> None:
    calls: list[tuple[str, int, str]] = []

    async def charge_reports(reports: Sequence[tuple[str, int, str]]) -> int:
        calls.extend(reports)
        if any(tokens == 13 for _, tokens, _ in reports):
            raise RuntimeError("the store is down")
        return len(reports)

    hub = TelemetryHub(["a"], clock=FakeClock())
    service = AccessLogService(hub, charge=UsageCharger(charge_reports).charge)
    messages = [
        message(charged_entry(usage={"total_tokens": 13}), charged_entry(marked=False)),
        message(charged_entry(usage={"total_tokens": 41})),
    ]

    asyncio.run(streamed(service, messages))
    assert calls == [(COUNTERS, 13, "total_tokens"), (COUNTERS, 41, "total_tokens")]
    # A failed call counts the entries it was given (the first message's two) as failed.
    assert (service.counters.charged, service.counters.charge_errors) == (1, 2)
    # The telemetry took every entry, charged or not.
    assert service.counters.observed == 3


def test_only_the_final_downstream_entry_of_a_request_is_charged() -> None:
    periodic = charged_entry()
    periodic.common_properties.intermediate_log_entry = True
    upstream = charged_entry()
    upstream.common_properties.access_log_type = accesslog_pb2.AccessLogType.UpstreamEnd
    assert usage_charges(periodic.common_properties) == []
    assert usage_charges(upstream.common_properties) == []
    unset = charged_entry()
    unset.common_properties.access_log_type = accesslog_pb2.AccessLogType.NotSet
    assert usage_charges(unset.common_properties) == [(COUNTERS, 41, "total_tokens")]


def test_a_slow_store_holds_up_neither_the_stream_nor_the_telemetry(monkeypatch: Any) -> None:
    monkeypatch.setattr(access_log, "MAX_CHARGING_BATCHES", 2)
    release = asyncio.Event()
    charged: list[int] = []

    async def stuck_store(reports: Sequence[tuple[str, int, str]]) -> int:
        await release.wait()
        charged.extend(tokens for _, tokens, _ in reports)
        return len(reports)

    hub = TelemetryHub(["a"], clock=FakeClock())
    service = AccessLogService(hub, charge=UsageCharger(stuck_store).charge)
    batches = [message(charged_entry(usage={"total_tokens": n})) for n in (1, 2, 3, 4)]

    def stream_ended() -> None:
        # The stream ended while every charge still waited for the store.
        assert service.counters.observed == 4 and charged == []
        release.set()

    asyncio.run(streamed(service, batches, stream_ended))
    # Two batches were under way; the two after them were dropped and counted.
    assert sorted(charged) == [1, 2]
    assert (service.counters.charged, service.counters.charges_dropped) == (2, 2)
    families = {f.name: f for f in TelemetryCollector(hub, service).collect()}
    outcomes = {s.labels["outcome"]: s.value for s in families["pe_access_log_charges"].samples}
    assert outcomes == {"charged": 2, "failed": 0, "dropped": 2}


def _charging_without_waits() -> AccessLogService:
    """A stream service whose charges never suspend, like the in-memory store's."""

    async def memory_store(reports: Sequence[tuple[str, int, str]]) -> int:
        return len(reports)

    return AccessLogService(TelemetryHub(["a"], clock=FakeClock()), charge=UsageCharger(memory_store).charge)


def test_a_long_batch_leaves_the_event_loop_turns_for_decisions() -> None:
    # A message holds a flush interval's entries; read and charged in one go, it would hold up
    # every decision arriving meanwhile. A task that runs whenever the loop turns sees the
    # batch's progress between its slices.
    seen_observed: set[int] = set()
    seen_charged: set[int] = set()

    service = _charging_without_waits()
    size = 10 * access_log.ENTRIES_PER_TURN
    batch = message(*(charged_entry() for _ in range(size)))

    async def scenario() -> None:
        done = False

        async def watch() -> None:
            while not done:
                seen_observed.add(service.counters.observed)
                seen_charged.add(service.counters.charged)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        try:
            await streamed(service, [batch])
        finally:
            done = True
            await watcher

    asyncio.run(scenario())
    assert (service.counters.observed, service.counters.charged) == (size, size)
    assert {n for n in seen_observed if 0 < n < size}, "the entries were read in one go"
    assert {n for n in seen_charged if 0 < n < size}, "the entries were charged in one go"


def test_a_stream_cancelled_in_the_middle_of_a_message_still_charges_it() -> None:
    # Envoy resets the stream, or the server shuts down, while a message is read a slice at a
    # time: its entries are charged all the same.
    service = _charging_without_waits()
    size = 10 * access_log.ENTRIES_PER_TURN

    async def scenario() -> None:
        async def messages() -> AsyncIterator[Any]:
            yield message(*(charged_entry() for _ in range(size)))
            await asyncio.Event().wait()  # the stream stays open

        stream = asyncio.ensure_future(service.StreamAccessLogs(messages(), None))
        await asyncio.sleep(0)  # the stream reads the first slice of the message
        assert 0 < service.counters.observed < size
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        await service.drain()

    asyncio.run(scenario())
    assert service.counters.charged == size
