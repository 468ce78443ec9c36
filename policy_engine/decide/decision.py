"""The outcome of one decision and the trace of how it was reached."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from policy_engine.decide.attributes import LlmRequest

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# The values of a decision are slotted, not frozen, dataclasses: a frozen one takes 3-6 times
# as long to build, and a decision builds a dozen. Treat them as values all the same: nothing
# assigns to a field after construction (dataclasses.replace makes changed copies).


@dataclass(slots=True)
class FiredRule:
    policy: str
    rule: str
    effect: str  # allow | deny | flag | shed | route | quota | canary | stable | error
    dry_run: bool = False
    detail: str = ""

    @property
    def id(self) -> str:
        return f"{self.policy}/{self.rule}"


@dataclass(slots=True)
class QuotaCheck:
    counter: str
    policy: str
    limit_name: str
    kind: str
    key: str
    limit: int
    window: float
    algorithm: str
    used: int
    cost: int  # what this request charges now (1 request, or the estimated tokens reserved)
    remaining: int
    reset_s: float
    exceeded: bool
    status: int = 429  # the denial when exceeded
    message: str = "quota exceeded"
    fail_open: bool = False  # the policy's on_error is allow: admit when the store is down


@dataclass(slots=True)
class Decision:
    allowed: bool
    status: int
    reason: str = ""
    message: str = ""
    route: str | None = None
    tenant: str = ""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)
    fired: tuple[FiredRule, ...] = ()
    dry_run: tuple[FiredRule, ...] = ()
    errors: tuple[str, ...] = ()
    quota: tuple[QuotaCheck, ...] = ()
    canary: Mapping[str, str] = field(default_factory=dict)
    bundle_version: str = ""
    # What the pipeline read from the request, handed to the audit after the answer so that it
    # does not parse the body again. Not part of the decision's value: never compared, shown
    # or serialised.
    llm: LlmRequest | None = field(default=None, compare=False, repr=False)
    request_body: Any = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> str | None:
        """The JSON error body in OpenAI's shape, for denials."""
        if self.allowed:
            return None
        error_type = _ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return json.dumps(
            {
                "error": {
                    "message": self.message or self.reason,
                    "type": error_type,
                    "param": None,
                    "code": self.reason,
                }
            }
        )

    def fired_ids(self) -> list[str]:
        return [f.id for f in self.fired]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, llm=None, request_body=None))
        del data["llm"], data["request_body"]
        data["body"] = self.body
        return data
