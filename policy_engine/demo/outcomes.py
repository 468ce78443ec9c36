"""What each demo request came back with, as the client sees it, and the running totals.

The kind of a denial comes from the stage that produced its reason code (read from the policy
bundle), so edited policies with new reason codes are still counted in the right column.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from policy_engine.policy.bundle import Bundle

ALLOWED = "allowed"
ACCESS = "denied_access"
MODERATION = "moderation_blocked"
QUOTA = "quota_exceeded"
SHED = "shed"
NO_BACKEND = "no_backend"
BACKEND_ERROR = "backend_error"
GATEWAY_ERROR = "gateway_error"
KINDS = (ALLOWED, ACCESS, MODERATION, QUOTA, SHED, NO_BACKEND, BACKEND_ERROR, GATEWAY_ERROR)
# What a demo run must show; the other kinds depend on timing and are reported when they happen.
REQUIRED_KINDS = (ALLOWED, ACCESS, MODERATION, QUOTA, SHED)
UNAVAILABLE_REASON = "no_backend_available"


def reason_stages(bundle: Bundle) -> dict[str, str]:
    """Reason code → outcome kind, from the policies that can produce it."""
    stages: dict[str, str] = {}
    for access in bundle.access:
        stages[access.default_denial.reason] = ACCESS
        for rule in access.rules:
            stages[rule.denial.reason] = ACCESS
    for moderation in bundle.moderation:
        for moderation_rule in moderation.rules:
            stages[moderation_rule.denial.reason] = MODERATION
    for routing in bundle.routing:
        for shed in routing.shedding:
            stages[shed.denial.reason] = SHED
        stages[routing.unavailable.reason] = NO_BACKEND
    for quota in bundle.quota:
        for limit in quota.limits:
            stages[limit.denial.reason] = QUOTA
    return stages


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int
    reason: str  # the service's reason code, "ok", or what went wrong on the way
    backend: str = ""  # the backend that answered


def classify(status: int, headers: Mapping[str, str], stages: Mapping[str, str]) -> Outcome:
    """`headers` with lower-case names; x-pe-reason marks the service's denials, x-backend an answer."""
    reason = headers.get("x-pe-reason", "")
    backend = headers.get("x-backend", "")
    if backend:
        kind = ALLOWED if status < 500 else BACKEND_ERROR
        return Outcome(kind, status, "ok" if kind == ALLOWED else f"backend_{status}", backend)
    if reason:
        kind = stages.get(reason) or _by_status(status)
        return Outcome(kind, status, reason)
    if status == 429:  # the rate-limit service's answer after a token charge has no reason header
        return Outcome(QUOTA, status, "rate_limit_exceeded")
    return Outcome(GATEWAY_ERROR, status, f"gateway_{status}")


def _by_status(status: int) -> str:
    if status in (401, 403):
        return ACCESS
    if status == 429:
        return QUOTA
    if status == 503:
        return SHED
    return MODERATION if status in (400, 413) else GATEWAY_ERROR


@dataclass
class Tally:
    """Counts by kind, reason, tenant and backend; fed by the traffic driver, read by the screen."""

    kinds: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    backends: Counter[str] = field(default_factory=Counter)
    tenants: dict[str, Counter[str]] = field(default_factory=dict)
    canary: Counter[str] = field(default_factory=Counter)  # "canary" / "stable" among eligible calls
    transport_errors: int = 0
    total: int = 0

    def record(self, tenant: str, outcome: Outcome, canary_backend: str | None = None) -> None:
        self.total += 1
        self.kinds[outcome.kind] += 1
        self.reasons[outcome.reason] += 1
        if outcome.backend:
            self.backends[outcome.backend] += 1
        self.tenants.setdefault(tenant, Counter())[outcome.kind] += 1
        if canary_backend is not None and outcome.kind == ALLOWED:
            self.canary["canary" if outcome.backend == canary_backend else "stable"] += 1

    def failed(self, tenant: str) -> None:
        """The gateway could not be reached or did not answer in time."""
        self.record(tenant, Outcome(GATEWAY_ERROR, 0, "no_answer"))
        self.transport_errors += 1

    def canary_share(self) -> float:
        served = self.canary["canary"] + self.canary["stable"]
        return self.canary["canary"] / served if served else 0.0
