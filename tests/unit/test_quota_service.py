"""QuotaService between decisions and a counter store: reservations, their return, fail-open.

A token budget reserves an estimate when the request is admitted and is charged `actual -
reserved` after the response. These tests follow one request through the decision, the store
(the memory store on a fake clock) and the after-response charge.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.attributes import RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.policy.compiler import load_bundle
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService
from policy_engine.quota.store import Admission, Charge, Demand, StoreUnavailable
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
T0 = 1_699_999_200.0  # hour-aligned: the free tier's token window (1 h) starts here
COUNTER = "tier-quotas/free-tokens/total_tokens/hobbyist"
WINDOW = 3600.0
BACKENDS = TelemetrySnapshot({name: BackendStats(name) for name in ("llama-8b-a", "llama-8b-b")})


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class LosingStore(MemoryStore):
    """A memory store that loses the charges of one hash tag, as a Redis store whose call for
    that tag failed."""

    lost_tag = ""
    calls = 0

    async def charge_many(self, charges: Sequence[Charge]) -> list[StoreUnavailable | None]:
        self.calls += 1
        kept = [c for c in charges if c.hash_tag != self.lost_tag]
        await super().charge_many(kept)
        return [
            StoreUnavailable("connection reset") if c.hash_tag == self.lost_tag else None for c in charges
        ]


class FlakyStore(MemoryStore):
    """A memory store whose admit can be made to fail as an unreachable Redis does: before it
    charges anything (`down`), or after charging, unable to return it (`fails_after_charging`,
    as a Redis store failing between two hash tags whose refund is lost)."""

    down = False
    fails_after_charging = False

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        if self.down:
            raise StoreUnavailable("connection refused")
        admission = await super().admit(demands)
        if self.fails_after_charging:
            kept = frozenset(d.counter for d in demands if d.cost > 0)
            raise StoreUnavailable("connection reset", kept=kept, at=admission.at)
        return admission


def setup(
    tmp_path: Path, on_error: str | None = None
) -> tuple[Pipeline, QuotaService, FlakyStore, FakeClock]:
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLES, policies)
    if on_error is not None:
        quotas = policies / "quotas.yaml"
        quotas.write_text(quotas.read_text().replace("spec:\n", f"spec:\n  on_error: {on_error}\n", 1))
    bundle = load_bundle(policies)
    clock = FakeClock()
    store = FlakyStore(clock=clock)
    return Pipeline(bundle), QuotaService(store, lambda: bundle, Metrics(CollectorRegistry())), store, clock


def chat(max_tokens: int) -> RequestAttributes:
    body = {
        "model": "llama-3-8b-instruct",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return RequestAttributes(
        method="POST",
        path="/v1/chat/completions",
        headers={"authorization": "Bearer sk-hobby-free-key-0003", "content-type": "application/json"},
        body=json.dumps(body).encode(),
    )


def reserve(pipeline: Pipeline, quota: QuotaService, max_tokens: int) -> Decision:
    return asyncio.run(quota.settle(pipeline.decide(chat(max_tokens), BACKENDS)))


def used(store: MemoryStore) -> int:
    return asyncio.run(store.usage(COUNTER, "hobbyist", WINDOW, "sliding"))


def charge(quota: QuotaService, decision: Decision, actual: int) -> None:
    assert (
        asyncio.run(
            quota.charge_reports([(decision.dynamic_metadata["pe_total_tokens"], actual, "total_tokens")])
        )
        == 1
    )


def test_the_actual_usage_replaces_the_reservation(tmp_path: Path) -> None:
    pipeline, quota, store, _ = setup(tmp_path)
    decision = reserve(pipeline, quota, 2000)
    assert decision.allowed
    reserved = used(store)
    assert reserved > 2000  # max_tokens and the prompt's estimate
    charge(quota, decision, 50)
    assert used(store) == 50


def test_a_reservation_is_returned_from_its_own_bucket_after_the_window_rolls(tmp_path: Path) -> None:
    # A reserves just before the hour ends, B just after it; A's return must not erase B's
    # reservation in the new hour (it comes out of the previous hour's bucket, where it went).
    pipeline, quota, store, clock = setup(tmp_path)
    clock.now = T0 + WINDOW - 1
    first = reserve(pipeline, quota, 2000)
    clock.now = T0 + WINDOW + 1
    assert reserve(pipeline, quota, 2000).allowed
    in_new_hour = asyncio.run(store.usage(COUNTER, "hobbyist", WINDOW, "fixed"))
    assert in_new_hour > 2000  # B's reservation
    charge(quota, first, 10)
    assert asyncio.run(store.usage(COUNTER, "hobbyist", WINDOW, "fixed")) == in_new_hour
    # Returned two windows later, a reservation's bucket no longer counts: nothing changes,
    # and the next hour's reservation (now the previous bucket) stays.
    clock.now = T0 + 3 * WINDOW + 1
    third = reserve(pipeline, quota, 2000)
    clock.now = T0 + 4 * WINDOW + 1
    assert reserve(pipeline, quota, 2000).allowed
    clock.now = T0 + 5 * WINDOW + 1
    before = used(store)
    assert before > 1900
    charge(quota, third, 0)
    assert used(store) == before


def test_metadata_names_when_the_store_reserved(tmp_path: Path) -> None:
    pipeline, quota, _, clock = setup(tmp_path)
    clock.now = T0 + 12.5
    decision = reserve(pipeline, quota, 100)
    ((counter, reserved, at),) = json.loads(decision.dynamic_metadata["pe_total_tokens"])
    assert (counter, at) == (COUNTER, T0 + 12.5) and reserved > 100


def test_failing_open_reserves_nothing_so_the_whole_usage_is_charged(tmp_path: Path) -> None:
    pipeline, quota, store, _ = setup(tmp_path, on_error="allow")
    asyncio.run(store.charge(COUNTER, "hobbyist", WINDOW, "sliding", 15000))  # the tenant's other traffic
    store.down = True
    decision = reserve(pipeline, quota, 2000)
    store.down = False
    assert decision.allowed and any("quota store" in error for error in decision.errors)
    # Nothing reserved: the metadata says so, and no rate-limit numbers are made up.
    assert json.loads(decision.dynamic_metadata["pe_total_tokens"]) == [[COUNTER, 0]]
    assert not any(name.startswith("x-ratelimit-") for name in decision.response_headers)
    charge(quota, decision, 50)
    assert used(store) == 15050


def test_failing_open_after_a_charge_that_stays_reserves_exactly_that(tmp_path: Path) -> None:
    # The store charged the estimate and failed before it could take it back: the metadata must
    # say it was reserved, or the after-response charge would add the usage on top of it.
    pipeline, quota, store, clock = setup(tmp_path, on_error="allow")
    asyncio.run(store.charge(COUNTER, "hobbyist", WINDOW, "sliding", 15000))
    clock.now = T0 + 7.0
    store.fails_after_charging = True
    decision = reserve(pipeline, quota, 2000)
    store.fails_after_charging = False
    assert decision.allowed and any("connection reset" in error for error in decision.errors)
    ((counter, reserved, at),) = json.loads(decision.dynamic_metadata["pe_total_tokens"])
    assert (counter, at) == (COUNTER, T0 + 7.0) and used(store) == 15000 + reserved > 17000
    charge(quota, decision, 50)
    assert used(store) == 15050


def test_failing_closed_refuses_with_a_503(tmp_path: Path) -> None:
    pipeline, quota, store, _ = setup(tmp_path)
    store.down = True
    decision = reserve(pipeline, quota, 2000)
    assert not decision.allowed and decision.status == 503 and decision.dynamic_metadata == {}


def test_malformed_reservation_entries_charge_nothing(tmp_path: Path) -> None:
    _, quota, store, _ = setup(tmp_path)
    for entries in (
        [[COUNTER, -5]],  # a negative reservation would over-charge
        [[COUNTER, True]],
        [[COUNTER, 5, "yesterday"]],
        [[COUNTER, 5, float("inf")]],
        [[COUNTER, 5, T0, "extra"]],
        [[COUNTER, 5, 10**400]],  # would overflow a float
        [[COUNTER, 5, 1.7e308]],  # would overflow the window arithmetic
        [[COUNTER, 5, -1.0]],
    ):
        assert asyncio.run(quota.charge_reports([(json.dumps(entries), 7, "total_tokens")])) == 0
    assert used(store) == 0


def test_reports_are_charged_in_one_store_call_and_a_lost_tag_is_counted(tmp_path: Path) -> None:
    pipeline, _, _, clock = setup(tmp_path)
    store = LosingStore(clock=clock)
    registry = CollectorRegistry()
    quota = QuotaService(store, lambda: pipeline.bundle, Metrics(registry))
    decision = asyncio.run(quota.settle(pipeline.decide(chat(100), BACKENDS)))
    entries = decision.dynamic_metadata["pe_total_tokens"]
    other = "tier-quotas/free-tokens/total_tokens/other-tenant"
    # Two counters in one report (this tenant's and another's, whose charge is lost).
    both = json.dumps([*json.loads(entries), [other, 0]])
    deep = "[" * 100_000 + "]" * 100_000  # unreadable: too deep for the JSON parser
    store.lost_tag = "other-tenant"
    reports = [(both, 30, "total_tokens"), ("not json", 5, "total_tokens"), (deep, 7, "total_tokens")]
    assert asyncio.run(quota.charge_reports(reports)) == 1
    assert store.calls == 1 and used(store) == 30
    # The lost charge is counted as a store error; the report's tokens once, though two counters.
    assert registry.get_sample_value("pe_quota_store_errors_total", {"operation": "charge"}) == 1
    assert registry.get_sample_value("pe_tokens_charged_total", {"kind": "total_tokens"}) == 30
