"""Quota arithmetic shared by the pipeline and the service: outcomes, headers, settlement.

The pipeline computes each request's quota checks against a view of usage. The service runs
it with an all-zero view, settles the checks atomically in its counter store, and applies the
store's answer here, so both paths decide with the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from json.encoder import encode_basestring_ascii as _json_string

from policy_engine.decide.decision import Decision, FiredRule, QuotaCheck
from policy_engine.quota.store import CounterState, exceeds

TOKEN_KINDS = ("input_tokens", "output_tokens", "total_tokens")
# Every x-ratelimit-* header quota_headers writes: the gateway removes them from the backends'
# answers (a hosted API's own describe its account, not the tenant's budgets), so a client never
# gets two values.
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{field}{kind}"
    for kind in ("", "-requests", "-tokens")
    for field in ("limit", "remaining", "reset")
)
# OpenAI's SDKs wait as long as retry-after says only below a minute (Node; Python up to one):
# a 429 with a minute or more to wait says `x-should-retry: false`.
SDK_RETRY_LIMIT_MS = 60_000
# Keys of the ext_authz dynamic metadata that Envoy's rate-limit actions read after the
# response: per token kind, the counters to charge and what was reserved on each.
METADATA_KEYS = {kind: f"pe_{kind}" for kind in TOKEN_KINDS}


def outcome(kind: str, limit: int, used: int, cost: int) -> tuple[bool, int]:
    """(exceeded, remaining) by the counter stores' admission rule."""
    is_request = kind == "requests"
    if exceeds(used, cost, limit, refuse_at_limit=not is_request):
        return True, 0
    # What is left once this request is counted: its tokens' estimate is reserved as it is
    # admitted, and may overshoot a token budget's last units (admitted while used < limit).
    return False, max(0, limit - used - cost)


def quota_headers(checks: Sequence[QuotaCheck], exceeded: Sequence[QuotaCheck] = ()) -> dict[str, str]:
    """The rate-limit headers of an answer, from its quota checks and those `exceeded` (a 429).

    `x-ratelimit-limit`, `-remaining` and `-reset` (seconds) describe one budget: on a 429 the
    exceeded one that frees last (`retry-after` and, for OpenAI's clients, `retry-after-ms` say
    when to retry), else the one with the least of its budget left. OpenAI's own pair of sets,
    which its SDKs and most LLM clients read to pace themselves, says the same per kind:
    `x-ratelimit-{limit,remaining,reset}-requests` for the request budgets and `-tokens` for the
    token budgets, the reset as a duration (`1s`, `6m0s`)."""
    # One pass over the checks, without a list per kind: this runs for every allowed request.
    requests = tokens = None
    for check in exceeded or checks:
        if check.kind == "requests":
            if requests is None or _binds_before(check, requests, exceeded):
                requests = check
        elif tokens is None or _binds_before(check, tokens, exceeded):
            tokens = check
    if exceeded:  # a kind none of whose budgets refused: how it stands, nothing spent
        if requests is None:
            requests = _tightest_unspent([c for c in checks if c.kind == "requests"])
        elif tokens is None:
            tokens = _tightest_unspent([c for c in checks if c.kind != "requests"])
    headers: dict[str, str] = {}
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(_left(requests, bool(exceeded)))
        headers["x-ratelimit-reset-requests"] = duration(requests.reset_s)
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(_left(tokens, bool(exceeded)))
        headers["x-ratelimit-reset-tokens"] = duration(tokens.reset_s)
    binding = longest_wait(exceeded) if exceeded else tightest(checks)
    if binding is None:
        return headers
    reset = max(0, math.ceil(binding.reset_s))
    headers["x-ratelimit-limit"] = str(binding.limit)
    headers["x-ratelimit-remaining"] = str(0 if exceeded else binding.remaining)
    headers["x-ratelimit-reset"] = str(reset)
    if exceeded:
        headers["retry-after"] = str(max(1, reset))
        wait_ms = _milliseconds(binding.reset_s)
        headers["retry-after-ms"] = str(max(1, wait_ms))
        if wait_ms >= SDK_RETRY_LIMIT_MS:
            # OpenAI's SDKs honour a retry-after of up to a minute; beyond it they retry on
            # their own backoff, into the same 429. This tells them not to.
            headers["x-should-retry"] = "false"
    return headers


def _tightest_unspent(checks: Sequence[QuotaCheck]) -> QuotaCheck | None:
    """On a 429, which spends nothing: the check with the smallest fraction of its budget left
    before this request."""
    best: QuotaCheck | None = None
    for check in checks:
        if best is None or (check.limit - check.used) * best.limit < (best.limit - best.used) * check.limit:
            best = check
    return best


def _left(check: QuotaCheck, refused: bool) -> int:
    """A budget's remaining units as the answer leaves it: none if it is exceeded; on a 429,
    which charges nothing, all it had; else what is left once this request is counted."""
    if check.exceeded:
        return 0
    return max(0, check.limit - check.used) if refused else check.remaining


def _binds_before(check: QuotaCheck, other: QuotaCheck, exceeded: Sequence[QuotaCheck]) -> bool:
    """Whether `check` describes a kind better than `other`: among exceeded budgets the one that
    frees later (longest_wait), else the one with the smaller fraction left (tightest)."""
    if exceeded:
        return check.reset_s > other.reset_s
    return check.remaining * other.limit < other.remaining * check.limit


def _milliseconds(seconds: float) -> int:
    """Whole milliseconds, rounded up (never early), but not by a float's error (12.2 s is
    12200 ms, not 12201)."""
    return max(0, math.ceil(seconds * 1000 - 1e-6))


def duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go's): `250ms`, `1.5s`, `6m0s`,
    `1h0m0s`."""
    milliseconds = _milliseconds(seconds)
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    whole, fraction = divmod(milliseconds, 1000)
    minutes, whole = divmod(whole, 60)
    text = f"{whole}s" if not fraction else f"{whole}.{fraction:03d}".rstrip("0") + "s"
    if not minutes:
        return text
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{text}" if hours else f"{minutes}m{text}"


def tightest(checks: Sequence[QuotaCheck]) -> QuotaCheck | None:
    """The check with the smallest fraction of its budget left."""
    best: QuotaCheck | None = None
    for check in checks:
        if best is None or check.remaining * best.limit < best.remaining * check.limit:
            best = check
    return best


def longest_wait(exceeded: Sequence[QuotaCheck]) -> QuotaCheck:
    """The exceeded check a 429's headers describe: the one that frees last, so that retrying
    when retry-after says finds every budget with room."""
    return max(exceeded, key=lambda check: check.reset_s)


def token_metadata(
    checks: Sequence[QuotaCheck], reserved_at: float | None = None, reserved: AbstractSet[str] | None = None
) -> dict[str, str]:
    """Per token kind, a JSON list of [counter, reserved] for the after-response charge, or
    [counter, reserved, reserved_at] once a store has charged the reservation at that time (its
    `Admission.at`), so that what is returned comes out of the bucket it went into. `reserved`
    names the counters whose estimate the store holds (None: all of them); the others reserved
    nothing (a store that failed open), so their charge is the whole usage."""
    at = "" if reserved_at is None else f",{reserved_at!r}"
    metadata = {}
    for kind in TOKEN_KINDS:
        # json.dumps(entries, separators=(",", ":")) spelled out: a third of the time.
        entries = [
            f"[{_json_string(c.counter)},{c.cost if reserved is None or c.counter in reserved else 0}{at}]"
            for c in checks
            if c.kind == kind
        ]
        if entries:
            metadata[METADATA_KEYS[kind]] = "[" + ",".join(entries) + "]"
    return metadata


def _with_token_metadata(metadata: Mapping[str, str], tokens: Mapping[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in metadata.items() if k not in _TOKEN_METADATA_KEYS}
    return {**kept, **tokens}


_TOKEN_METADATA_KEYS = frozenset(METADATA_KEYS.values())


def without_rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` without the quota headers (quota_headers)."""
    return {k: v for k, v in headers.items() if not k.startswith(_RATE_HEADER_PREFIXES)}


_RATE_HEADER_PREFIXES = ("x-ratelimit-", "retry-after", "x-should-retry")


_AFTER_QUOTA = frozenset({"canary", "stable", "route"})  # effects of the canary and routing stages


def settle(
    decision: Decision, states: Sequence[CounterState], admitted: bool, at: float | None = None
) -> Decision:
    """Apply the store's usage to an allowed decision's checks; deny when a budget is exceeded.

    `at` is the store's clock when it charged (`Admission.at`), recorded in the token metadata."""
    by_counter = {s.counter: s for s in states}
    checks = []
    for check in decision.quota:
        state = by_counter.get(check.counter)
        if state is None:
            checks.append(check)
            continue
        exceeded, remaining = outcome(check.kind, check.limit, state.used, check.cost)
        checks.append(
            dataclasses.replace(
                check, used=state.used, reset_s=state.reset_s, exceeded=exceeded, remaining=remaining
            )
        )
    headers = without_rate_headers(decision.response_headers)
    over = [c for c in checks if c.exceeded]
    refused = over[0] if over else None
    if admitted or refused is None:
        headers.update(quota_headers(checks))
        metadata = _with_token_metadata(decision.dynamic_metadata, token_metadata(checks, reserved_at=at))
        return dataclasses.replace(
            decision, quota=tuple(checks), response_headers=headers, dynamic_metadata=metadata
        )
    headers.update(quota_headers(checks, over))
    # As if the quota stage had refused: its rule fired `deny`, and nothing after it ran (later
    # quota limits, the canary and routing stages).
    fired: list[FiredRule] = []
    for rule in decision.fired:
        if (rule.policy, rule.rule, rule.effect) == (refused.policy, refused.limit_name, "quota"):
            fired.append(dataclasses.replace(rule, effect="deny"))
            break
        if rule.effect not in _AFTER_QUOTA:
            fired.append(rule)
    return dataclasses.replace(
        decision,
        allowed=False,
        status=refused.status,
        reason="rate_limit_exceeded",
        message=refused.message,
        route=None,
        upstream_headers={},
        response_headers=headers,
        dynamic_metadata={},
        canary={},
        quota=tuple(checks),
        fired=tuple(fired),
    )


def store_failed(
    decision: Decision, error: str, kept: AbstractSet[str] = frozenset(), at: float | None = None
) -> Decision:
    """The counter store is down: policies with on_error allow admit, the others refuse.

    `kept` and `at` are what the store left charged, and when (StoreUnavailable)."""
    errors = (*decision.errors, f"quota store: {error}")
    if all(check.fail_open for check in decision.quota):
        # Nothing was reserved (but what the store kept), so the charge after the response must
        # be the whole usage, not usage minus an estimate (which would hand back other requests'
        # reservations). And no x-ratelimit-* headers: the numbers behind them were never read.
        return dataclasses.replace(
            decision,
            errors=errors,
            response_headers=without_rate_headers(decision.response_headers),
            dynamic_metadata=_with_token_metadata(
                decision.dynamic_metadata, token_metadata(decision.quota, reserved_at=at, reserved=kept)
            ),
        )
    return dataclasses.replace(
        decision,
        allowed=False,
        status=503,
        reason="quota_unavailable",
        message="quota service unavailable, retry later",
        route=None,
        upstream_headers={},
        response_headers={"retry-after": "1"},
        dynamic_metadata={},
        canary={},
        errors=errors,
    )
