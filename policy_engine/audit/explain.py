"""`policy-engine explain`: replay a logged decision and show why each rule fired.

The logged inputs (request without its secrets, parsed body, quota usage, telemetry snapshot,
resolved tenant) go through the pipeline again; each fired rule's condition is split into its
`&&` / `||` operands (recursively inside parenthesised groups) and every part is evaluated in
the same CEL environment, on the same values the pipeline saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from policy_engine.cel.engine import Activation, CelError, Environment
from policy_engine.cel.source_text import code_positions
from policy_engine.decide.attributes import Peer, RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.decide.tenants import FixedTenant, Tenant, TenantRegistry
from policy_engine.policy import bundle as b
from policy_engine.quota.view import StaticUsage
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

_OPEN, _CLOSE = "([{", ")]}"


@dataclass
class Part:
    """A condition or one of its operands, with its value once evaluated."""

    text: str
    operator: str = ""  # && or || joining the children; "" for a leaf
    children: list[Part] = field(default_factory=list)
    value: Any = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"expr": self.text}
        if self.error:
            data["error"] = self.error
        else:
            data["value"] = self.value
        if self.children:
            data["operator"] = self.operator
            data["parts"] = [c.to_dict() for c in self.children]
        return data


def _scan(source: str) -> tuple[list[tuple[int, str]], bool]:
    """Positions of `&&`, `||` and `?` outside strings, comments and brackets, and whether the
    bracket depth ever went below zero (the text closes a group it did not open)."""
    found: list[tuple[int, str]] = []
    depth, underflow, after = 0, False, -1
    for i in code_positions(source):
        if i <= after:  # the second character of `&&` or `||`
            continue
        char = source[i]
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            underflow = underflow or depth < 0
        elif depth == 0 and source[i : i + 2] in ("&&", "||"):
            found.append((i, source[i : i + 2]))
            after = i + 1
        elif depth == 0 and char == "?":
            found.append((i, "?"))
    return found, underflow


def _wrapped(source: str) -> bool:
    """Whether the whole text is one parenthesised group: `(a) && (b)` is not."""
    return source.startswith("(") and source.endswith(")") and not _scan(source[1:-1])[1]


def split_condition(source: str) -> Part:
    """The operand tree of a condition: `||` binds loosest, then `&&`; a ternary stays whole."""
    text = source.strip()
    operators, _ = _scan(text)
    if any(op == "?" for _, op in operators):
        return Part(text)
    for wanted in ("||", "&&"):
        cuts = [i for i, op in operators if op == wanted]
        if cuts:
            pieces, start = [], 0
            for cut in cuts:
                pieces.append(text[start:cut])
                start = cut + 2
            pieces.append(text[start:])
            return Part(text, wanted, [split_condition(p) for p in pieces])
    if _wrapped(text):
        inner = split_condition(text[1:-1])
        return Part(text, inner.operator, inner.children)
    return Part(text)


def evaluate(part: Part, env: Environment, activation: Activation) -> Part:
    """Fill in the value of every part (an error is shown, never raised)."""
    try:
        part.value = env.compile(part.text).eval(activation)
    except CelError as error:
        part.error = str(error) or type(error).__name__
    for child in part.children:
        evaluate(child, env, activation)
    return part


def display(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- replay --------------------------------------------------------------------------------


class _Capturing(Pipeline):
    """A pipeline that keeps the values of its last run, to evaluate sub-expressions on them."""

    activation: Activation | None = None

    def _finish(self, run: Any, allowed: bool, denial: b.Denial | None) -> Decision:
        self.activation = run.activation
        return super()._finish(run, allowed, denial)


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _peer(data: Any) -> Peer:
    data = data if isinstance(data, dict) else {}
    return Peer(str(data.get("principal", "")), str(data.get("address", "")), dict(data.get("labels") or {}))


def attributes_of(record: Mapping[str, Any]) -> RequestAttributes:
    given = record.get("input") or {}
    if record.get("body") is not None:
        body = json.dumps(record["body"]).encode()
    else:
        body = str(record.get("raw_body") or "").encode()
    return RequestAttributes(
        method=str(given.get("method", "GET")),
        path=str(given.get("path", "/")),
        host=str(given.get("host", "")),
        scheme=str(given.get("scheme", "")),
        protocol=str(given.get("protocol", "")),
        id=str(record.get("request_id", "")),
        headers={str(k): str(v) for k, v in (given.get("headers") or {}).items()},
        body=body,
        body_truncated=bool(given.get("truncated", False)),
        size=int(given.get("size", -1)),
        time=_time(given.get("time")),
        source=_peer(given.get("source")),
        destination=_peer(given.get("destination")),
        context={str(k): str(v) for k, v in (given.get("context") or {}).items()},
    )


def snapshot_of(record: Mapping[str, Any]) -> TelemetrySnapshot:
    logged = record.get("telemetry") or {}
    backends = {}
    for name, fields in (logged.get("backends") or {}).items():
        values = dict(fields)
        if values.get("age_s") is None:
            values["age_s"] = float("inf")
        backends[name] = BackendStats(name=name, **values)
    version = int(logged.get("version", 0))
    return TelemetrySnapshot(backends=backends, load=logged.get("load"), version=version)


def usage_of(record: Mapping[str, Any]) -> StaticUsage:
    used: dict[str, dict[str, int]] = {}
    for check in record.get("quota") or []:
        used.setdefault(str(check["rule"]), {})[str(check["kind"])] = int(check["used"])
    return StaticUsage(used)


def tenant_of(record: Mapping[str, Any], registry: TenantRegistry) -> tuple[Tenant, str | None]:
    """The tenant as it was resolved, and a warning when the bundle no longer knows it."""
    tenant_id = str(record.get("tenant") or "")
    credential = str(record.get("credential") or "none")
    if not tenant_id:
        return Tenant(credential=credential), None
    known = registry.known(tenant_id, credential, str(record.get("key_id") or ""))
    if known is None:
        return Tenant(credential=credential), f"tenant {tenant_id!r} is unknown to these policies: anonymous"
    return known, None


@dataclass
class FiredExplanation:
    rule: str
    effect: str
    conditions: list[tuple[str, Part]]  # (what the condition is, its evaluated tree)


@dataclass
class Explanation:
    record: Mapping[str, Any]
    replayed: Decision
    warnings: list[str]
    fired: list[FiredExplanation]

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.record.get("request_id"),
            "logged": {
                "decision": self.record.get("decision"),
                "status": self.record.get("status"),
                "reason": self.record.get("reason"),
                "bundle": self.record.get("bundle"),
            },
            "replayed": {
                "decision": "allow" if self.replayed.allowed else "deny",
                "status": self.replayed.status,
                "reason": self.replayed.reason,
                "bundle": self.replayed.bundle_version,
            },
            "warnings": self.warnings,
            "fired": [
                {
                    "rule": f.rule,
                    "effect": f.effect,
                    "conditions": [{"role": role, **part.to_dict()} for role, part in f.conditions],
                }
                for f in self.fired
            ],
        }


def _conditions(bundle: b.Bundle, policy_name: str, rule: str) -> list[tuple[str, b.Expr]]:
    """The expressions that made `policy/rule` fire: the policy's `when`, then the rule's."""
    for policy in bundle.policies():
        if policy.name != policy_name:
            continue
        found: list[tuple[str, b.Expr]] = []
        if policy.when is not None:
            found.append(("policy applies when", policy.when))
        if isinstance(policy, b.CanaryPolicy):
            found.append(("eligible", policy.eligible))
            return found
        rules: tuple[b.Rule, ...] = ()
        if isinstance(policy, b.AccessPolicy | b.ModerationPolicy):
            rules = policy.rules
        elif isinstance(policy, b.RoutingPolicy):
            rules = (*policy.shedding, *policy.routes)
        elif isinstance(policy, b.QuotaPolicy):
            rules = policy.limits
        for candidate in rules:
            if candidate.name == rule:
                found.append(("when", candidate.when))
        return found
    return []


def explain(record: Mapping[str, Any], bundle: b.Bundle) -> Explanation:
    warnings: list[str] = []
    logged_bundle = str(record.get("bundle") or "")
    if logged_bundle and logged_bundle != bundle.version:
        warnings.append(
            f"the request was decided by bundle {logged_bundle}, these policies are {bundle.version}: "
            "the replay may differ"
        )
    tenant, warning = tenant_of(record, bundle.tenants)
    if warning:
        warnings.append(warning)
    pipeline = _Capturing(replace(bundle, tenants=FixedTenant(tenant, bundle.tenants.key_headers)))
    decision = pipeline.decide(attributes_of(record), snapshot_of(record), usage_of(record))
    outcome = "allow" if decision.allowed else "deny"
    logged_fired = [str(f.get("rule")) for f in record.get("fired") or [] if isinstance(f, dict)]
    if outcome != record.get("decision") or decision.fired_ids() != logged_fired:
        warnings.append(
            f"the replay decided {outcome} {decision.status} {decision.reason} with "
            f"{', '.join(decision.fired_ids()) or 'no rule'}; the log says {record.get('decision')} "
            f"{record.get('status')} {record.get('reason')} with {', '.join(logged_fired) or 'no rule'}"
        )
    fired = []
    for rule in decision.fired:
        conditions = []
        if pipeline.activation is not None:
            for role, expr in _conditions(bundle, rule.policy, rule.rule):
                tree = evaluate(split_condition(expr.source), bundle.env, pipeline.activation)
                conditions.append((role, tree))
        effect = rule.effect + (" (dry run)" if rule.dry_run else "")
        fired.append(FiredExplanation(rule.id, effect, conditions))
    return Explanation(record, decision, warnings, fired)
