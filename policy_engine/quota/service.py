"""Quota between decisions and the counter store: admit at request time, charge after it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.decision import Decision
from policy_engine.decide.quota import TOKEN_KINDS, settle, store_failed
from policy_engine.log_throttle import LogThrottle
from policy_engine.policy.bundle import Bundle
from policy_engine.quota.store import Charge, CounterStore, Demand, StoreUnavailable
from policy_engine.quota.view import parse_counter

log = logging.getLogger("policy_engine.quota")


class QuotaService:
    def __init__(self, store: CounterStore, bundle: Callable[[], Bundle], metrics: Metrics) -> None:
        self._store = store
        self._bundle = bundle
        self._metrics = metrics
        # The labelled series, looked up once: labels() validates and locks on every call,
        # and admit runs on every request.
        self._latency = {op: metrics.store_latency.labels(op) for op in ("admit", "charge")}
        self._errors = {op: metrics.store_errors.labels(op) for op in ("admit", "charge")}
        self._tokens = {kind: metrics.tokens_charged.labels(kind) for kind in TOKEN_KINDS}
        self._warn = LogThrottle(log)  # an outage fails every request: a line per interval

    async def settle(self, decision: Decision) -> Decision:
        """Charge an allowed decision's counters atomically, or turn it into a 429."""
        if not decision.allowed or not decision.quota:
            return decision
        demands = [
            Demand(
                counter=check.counter,
                hash_tag=check.key,
                limit=check.limit,
                window=check.window,
                algorithm="fixed" if check.algorithm == "fixed" else "sliding",
                cost=check.cost,
                refuse_at_limit=check.kind != "requests",
            )
            for check in decision.quota
        ]
        start = time.perf_counter()
        try:
            admission = await self._store.admit(demands)
        except StoreUnavailable as error:
            self._errors["admit"].inc()
            self._warn.warning("admit", "quota store unavailable: %s", error)
            return store_failed(decision, str(error), error.kept, error.at)
        finally:
            self._latency["admit"].observe(time.perf_counter() - start)
        return settle(decision, admission.states, admission.admitted, admission.at)

    async def charge_reports(self, reports: Sequence[UsageReport]) -> int:
        """After the responses: charge `actual - reserved` on each counter named in each report's
        metadata, in one call to the store (with Redis, one round trip per tenant's hash tag).

        Returns how many counters were charged. Malformed metadata charges nothing.
        """
        bundle = self._bundle()
        charges: list[Charge] = []
        owners: list[int] = []
        for index, (entries_json, actual, kind) in enumerate(reports):
            try:
                found = _charges(bundle, entries_json, actual, kind)
            except Exception:  # one report that cannot be read must not lose the others
                log.warning("ignoring unreadable token metadata %r", entries_json[:200], exc_info=True)
                continue
            for charge in found:
                charges.append(charge)
                owners.append(index)
        if not charges:
            return 0
        start = time.perf_counter()
        try:
            failures = await self._store.charge_many(charges)
        finally:
            self._latency["charge"].observe(time.perf_counter() - start)
        charged = [0] * len(reports)
        for charge, owner, failure in zip(charges, owners, failures, strict=True):
            if failure is None:
                charged[owner] += 1
            else:
                self._errors["charge"].inc()
                self._warn.warning("charge", "token charge of %s lost: %s", charge.counter, failure)
        for (_, actual, kind), count in zip(reports, charged, strict=True):
            if count:
                series = self._tokens.get(kind)
                if series is None:  # not a token kind the bootstrap charges; counted all the same
                    series = self._metrics.tokens_charged.labels(kind)
                series.inc(max(0, actual))
        return sum(charged)


# What a response reported for one token kind: the decision's token metadata (a JSON list of
# [counter, reserved(, reserved_at)]), the tokens used, and the kind.
UsageReport = tuple[str, int, str]


def _charges(bundle: Bundle, entries_json: str, actual: int, kind: str) -> list[Charge]:
    """`actual - reserved` for each counter of the metadata that the bundle still budgets;
    nothing for malformed or forged entries."""
    try:
        entries = json.loads(entries_json)
    except ValueError:
        log.warning("ignoring malformed token metadata %r", entries_json[:200])
        return []
    if not isinstance(entries, list):
        return []
    charges = []
    for entry in entries:
        # [counter, reserved] or [counter, reserved, reserved_at] (token_metadata)
        if not (isinstance(entry, list) and len(entry) in (2, 3) and isinstance(entry[0], str)):
            continue
        counter, reserved = entry[0], entry[1]
        reserved_at = entry[2] if len(entry) == 3 else None
        if reserved_at is not None and not _is_time(reserved_at):
            continue
        parsed = parse_counter(counter)
        budget = bundle.budget(parsed.policy, parsed.limit, parsed.kind) if parsed else None
        if parsed is None or budget is None or parsed.kind != kind or not _is_count(reserved):
            continue  # the policy changed since the request, or a forged entry
        window, algorithm = budget
        charges.append(Charge(counter, parsed.key, window, algorithm, actual - reserved, reserved_at))
    return charges


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A reservation's time is the store's clock, seconds since the epoch: anything outside this
# range is forged or corrupt (and a huge value would overflow the window arithmetic).
_LATEST_TIME = 1e11


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < _LATEST_TIME
