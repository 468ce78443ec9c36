"""The policy file format (pydantic): what a document under policies/ may contain.

Unknown fields are rejected everywhere so a misspelt key is an error, not a silent no-op.
CEL strings are only syntax here; the compiler type-checks them.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

API_VERSION = "policy-engine/v1"

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
HEADER_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """'500ms', '30s', '1m', '2h', '1d' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use a number of seconds or e.g. '500ms', '30s', '1m'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be a positive, finite number of seconds")
    return seconds


Duration = Annotated[
    float,
    Field(json_schema_extra={"type": ["string", "number"], "examples": ["30s", "1m", 3600]}),
]
CelExpr = Annotated[
    str,
    Field(min_length=1, description="A CEL expression (see docs/policy-language.md)."),
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
HeaderName = Annotated[str, Field(pattern=HEADER_PATTERN)]
# Reserved: Envoy's HTTP ext_authz protocol takes any 5xx answer for a failure of the service,
# so policy-engine answers a 5xx denial over it with one of these and Envoy maps it back
# (policy_engine.envoy.http_authz.DENIAL_CARRIERS); a policy denying with one would be remapped.
RESERVED_STATUSES = range(480, 492)


def _not_reserved(status: int) -> int:
    if status in RESERVED_STATUSES:
        raise ValueError(
            f"statuses {RESERVED_STATUSES.start}-{RESERVED_STATUSES.stop - 1} are reserved "
            "(they carry 5xx denials over Envoy's HTTP ext_authz protocol)"
        )
    return status


Status = Annotated[
    int,
    Field(
        ge=400,
        le=599,
        json_schema_extra={
            "not": {"minimum": RESERVED_STATUSES.start, "maximum": RESERVED_STATUSES.stop - 1}
        },
    ),
    AfterValidator(_not_reserved),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mode(StrEnum):
    enforce = "enforce"
    dry_run = "dry_run"


class OnError(StrEnum):
    allow = "allow"
    deny = "deny"


class Metadata(Strict):
    name: Name
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class SpecBase(Strict):
    mode: Mode = Field(
        Mode.enforce, description="dry_run records what the policy would do and changes nothing."
    )
    on_error: OnError = Field(
        OnError.deny, description="What a run-time expression error means for this policy."
    )
    when: CelExpr | None = Field(None, description="The policy applies only where this is true.")


class Denial(Strict):
    status: Status = 403
    reason: str = Field("access_denied", pattern=r"^[a-z0-9_]+$", description="Machine-readable code.")
    message: str = Field("", description="Human-readable text for the error body.")


# --- AccessPolicy --------------------------------------------------------------------------


class AccessRule(Denial):
    name: Name
    effect: Literal["allow", "deny"]
    when: CelExpr


class AccessSpec(SpecBase):
    default: Literal["allow", "deny"] = Field(
        "deny", description="Decision when no rule fires: deny unless an allow rule fired."
    )
    default_status: Status = 403
    default_reason: str = Field("access_denied", pattern=r"^[a-z0-9_]+$")
    default_message: str = "access denied"
    rules: list[AccessRule] = Field(min_length=1)


class AccessPolicy(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["AccessPolicy"]
    metadata: Metadata
    spec: AccessSpec


# --- ModerationPolicy ----------------------------------------------------------------------


class ModerationRule(Denial):
    name: Name
    when: CelExpr
    action: Literal["deny", "flag"] = Field(
        "deny", description="deny blocks the request; flag lets it through and marks it."
    )
    status: Status = 400
    reason: str = Field("content_policy_violation", pattern=r"^[a-z0-9_]+$")


class ModerationSpec(SpecBase):
    term_lists: dict[Name, list[str]] = Field(
        default_factory=dict,
        description="Named term lists for terms.any(text, 'name') / terms.find(text, 'name').",
    )
    rules: list[ModerationRule] = Field(min_length=1)


class ModerationPolicy(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["ModerationPolicy"]
    metadata: Metadata
    spec: ModerationSpec


# --- RoutingPolicy -------------------------------------------------------------------------


class Route(Strict):
    name: Name
    when: CelExpr = "true"
    candidates: list[Name] = Field(min_length=1, description="Backends this route may pick.")
    require: CelExpr = Field(
        "backend.healthy && !backend.stale",
        description="A candidate is eligible only where this is true (variable `backend`).",
    )
    score: CelExpr | None = Field(
        None, description="Lowest score wins (variable `backend`); without it, the first eligible."
    )
    fallback: list[Name] = Field(
        default_factory=list,
        description="When no candidate is eligible: the eligible fallback with the lowest score "
        "(without a score, the first eligible).",
    )
    headers: dict[HeaderName, CelExpr] = Field(
        default_factory=dict,
        description="Extra upstream headers: name → CEL string expression (null: the header is left out).",
    )
    explore: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Share of requests sent to another eligible candidate than the best, so that "
        "the statistics of the others stay fresh (a backend that recovered is noticed).",
    )


class ShedRule(Strict):
    name: Name
    when: CelExpr
    status: Status = 503
    retry_after: Duration = Field(5.0, description="Seconds, sent as Retry-After.")
    reason: str = Field("overloaded", pattern=r"^[a-z0-9_]+$")
    message: str = "the service is overloaded, retry later"

    _duration = field_validator("retry_after", mode="before")(parse_duration)


class RoutingSpec(SpecBase):
    routes: list[Route] = Field(default_factory=list, description="First matching route wins.")
    shedding: list[ShedRule] = Field(default_factory=list)
    unavailable_status: Status = Field(503, description="When a route matched but no backend is eligible.")
    unavailable_retry_after: Duration = 5.0

    _duration = field_validator("unavailable_retry_after", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _something(self) -> RoutingSpec:
        if not self.routes and not self.shedding:
            raise ValueError("a RoutingPolicy needs routes or shedding rules")
        return self


class RoutingPolicy(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["RoutingPolicy"]
    metadata: Metadata
    spec: RoutingSpec


# --- QuotaPolicy ---------------------------------------------------------------------------


class RequestLimit(Strict):
    limit: int = Field(gt=0)
    window: Duration

    _duration = field_validator("window", mode="before")(parse_duration)


class TokenLimit(Strict):
    input: int | None = Field(None, gt=0, description="Prompt tokens per window.")
    output: int | None = Field(None, gt=0, description="Completion tokens per window.")
    total: int | None = Field(None, gt=0, description="Prompt plus completion tokens per window.")
    window: Duration
    unlimited_output: int = Field(
        0,
        ge=0,
        description="Output tokens reserved per completion for a request that sets no max_tokens "
        "(a backend then generates up to its context length): what a stream that reports no usage is "
        "charged. 0 reserves none.",
    )

    _duration = field_validator("window", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _one_limit(self) -> TokenLimit:
        if self.input is None and self.output is None and self.total is None:
            raise ValueError("set at least one of input, output, total")
        return self


class QuotaLimit(Strict):
    name: Name
    when: CelExpr = "true"
    key: CelExpr = Field(description="CEL string: whose counter this is (e.g. tenant.id).")
    requests: RequestLimit | None = None
    tokens: TokenLimit | None = None
    algorithm: Literal["sliding", "fixed"] = "sliding"
    status: Status = 429
    message: str = "quota exceeded"

    @model_validator(mode="after")
    def _one_budget(self) -> QuotaLimit:
        if self.requests is None and self.tokens is None:
            raise ValueError("set requests, tokens or both")
        return self


class QuotaSpec(SpecBase):
    limits: list[QuotaLimit] = Field(min_length=1)


class QuotaPolicy(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["QuotaPolicy"]
    metadata: Metadata
    spec: QuotaSpec


# --- CanaryPolicy --------------------------------------------------------------------------


class Rollout(Strict):
    steps: list[int] = Field(min_length=1, description="Canary weights in percent, ascending, ending at 100.")
    interval: Duration = 60.0
    min_requests: int = Field(20, ge=0, description="Requests to the canary per interval before analysis.")
    analysis: CelExpr = Field(
        "canary.error_rate <= stable.error_rate + 0.01",
        description="True when the canary is healthy (variables `canary`, `stable`: Backend).",
    )
    inconclusive_after: int = Field(3, ge=1, description="Intervals without enough traffic.")
    on_inconclusive: Literal["hold", "rollback", "promote"] = "hold"

    _duration = field_validator("interval", mode="before")(parse_duration)

    @field_validator("steps")
    @classmethod
    def _ascending(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be distinct, ascending percentages in 1..100")
        return steps


class CanarySpec(SpecBase):
    stable: Name = Field(description="The stable backend (or subset) name.")
    canary: Name = Field(description="The canary backend (or subset) name.")
    weight: int = Field(0, ge=0, le=100, description="Initial canary weight in percent.")
    eligible: CelExpr = Field("true", description="Requests that may be sent to the canary.")
    sticky_key: CelExpr = Field(
        "tenant.id", description="CEL string: requests with the same key get the same variant."
    )
    header: HeaderName = Field("x-pe-canary", description="Upstream header carrying the variant.")
    rollout: Rollout | None = None


class CanaryPolicy(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["CanaryPolicy"]
    metadata: Metadata
    spec: CanarySpec


# --- TenantSet -----------------------------------------------------------------------------


class ApiKey(Strict):
    id: Name = Field(description="Non-secret key id, logged instead of the key.")
    hash: str = Field(
        pattern=r"^sha256\$[0-9a-f]{32}\$[0-9a-f]{64}$",
        description="sha256$<salt hex>$<digest hex>, from `policy-engine hash-key`.",
    )
    prefix: str = Field(min_length=4, max_length=16, description="The key's first characters (lookup index).")


class TenantEntry(Strict):
    id: Name
    tier: str = "free"
    models: list[str] = Field(default_factory=lambda: ["*"], description="Allowed models (globs).")
    labels: dict[str, str] = Field(default_factory=dict)
    api_keys: list[ApiKey] = Field(default_factory=list)
    principals: list[str] = Field(default_factory=list, description="SPIFFE IDs mapped to this tenant.")


class TenantSpec(Strict):
    key_headers: list[HeaderName] = Field(
        default_factory=lambda: ["authorization", "x-api-key"],
        description="Where the API key is read ('Bearer ' stripped from authorization).",
    )
    tenants: list[TenantEntry] = Field(min_length=1)


class TenantSet(Strict):
    apiVersion: Literal["policy-engine/v1"]
    kind: Literal["TenantSet"]
    metadata: Metadata
    spec: TenantSpec


PolicyDocument = Annotated[
    AccessPolicy | ModerationPolicy | RoutingPolicy | QuotaPolicy | CanaryPolicy | TenantSet,
    Field(discriminator="kind"),
]
KINDS = ("AccessPolicy", "ModerationPolicy", "RoutingPolicy", "QuotaPolicy", "CanaryPolicy", "TenantSet")
DOCUMENT_ADAPTER: TypeAdapter[PolicyDocument] = TypeAdapter(PolicyDocument)


def json_schema() -> dict[str, Any]:
    schema = DOCUMENT_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "policy-engine policy document"
    return schema
