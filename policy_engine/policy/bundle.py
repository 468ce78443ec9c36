"""A compiled, immutable policy bundle: what the decision pipeline runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from policy_engine.cel.engine import Environment, Program
from policy_engine.decide.tenants import TenantRegistry
from policy_engine.policy.schema import Mode, OnError, Rollout
from policy_engine.policy.source import Position


@dataclass(frozen=True)
class Expr:
    program: Program
    position: Position

    @property
    def source(self) -> str:
        return self.program.source


@dataclass(frozen=True)
class Denial:
    status: int
    reason: str
    message: str


@dataclass(frozen=True)
class Rule:
    name: str
    when: Expr


@dataclass(frozen=True)
class AccessRule(Rule):
    effect: Literal["allow", "deny"]
    denial: Denial


@dataclass(frozen=True)
class ModerationRule(Rule):
    action: Literal["deny", "flag"]
    denial: Denial


@dataclass(frozen=True)
class ShedRule(Rule):
    denial: Denial
    retry_after: float


@dataclass(frozen=True)
class Route(Rule):
    candidates: tuple[str, ...]
    require: Expr
    score: Expr | None
    fallback: tuple[str, ...]
    headers: tuple[tuple[str, Expr], ...]
    explore: float = 0.0
    # One evaluation for all candidates, another for all fallbacks (made only when no
    # candidate is eligible): per backend, [score] when it is eligible, [] when not. None
    # when it could not be built (the per-backend path is used).
    pick: Program | None = field(default=None, compare=False, repr=False)
    pick_fallback: Program | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Budget:
    kind: Literal["requests", "input_tokens", "output_tokens", "total_tokens"]
    limit: int
    window: float
    unlimited_output: int = 0  # output tokens reserved per completion when max_tokens is unset


@dataclass(frozen=True)
class QuotaLimit(Rule):
    key: Expr
    budgets: tuple[Budget, ...]
    algorithm: Literal["sliding", "fixed"]
    denial: Denial


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str
    mode: Mode
    on_error: OnError
    when: Expr | None
    position: Position
    # mode is dry_run: a field, not a property, as the pipeline reads it several times a decision
    dry_run: bool = field(init=False, default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dry_run", self.mode is Mode.dry_run)

    def rule_ids(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class AccessPolicy(Policy):
    rules: tuple[AccessRule, ...]
    default: Literal["allow", "deny"]
    default_denial: Denial
    batch: Program | None = field(default=None, compare=False, repr=False)

    def rule_ids(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{r.name}" for r in self.rules)


@dataclass(frozen=True)
class ModerationPolicy(Policy):
    rules: tuple[ModerationRule, ...]
    batch: Program | None = field(default=None, compare=False, repr=False)

    def rule_ids(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{r.name}" for r in self.rules)


@dataclass(frozen=True)
class RoutingPolicy(Policy):
    routes: tuple[Route, ...]
    shedding: tuple[ShedRule, ...]
    unavailable: Denial
    unavailable_retry_after: float
    shed_batch: Program | None = field(default=None, compare=False, repr=False)
    route_batch: Program | None = field(default=None, compare=False, repr=False)

    def rule_ids(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{r.name}" for r in (*self.shedding, *self.routes))


@dataclass(frozen=True)
class QuotaPolicy(Policy):
    limits: tuple[QuotaLimit, ...]
    # Per limit: [key] when its condition holds, [] when not; one evaluation for the policy.
    batch: Program | None = field(default=None, compare=False, repr=False)

    def rule_ids(self) -> tuple[str, ...]:
        return tuple(f"{self.name}/{r.name}" for r in self.limits)


@dataclass(frozen=True)
class CanaryPolicy(Policy):
    stable: str
    canary: str
    weight: int
    eligible: Expr
    sticky_key: Expr
    header: str
    rollout: Rollout | None
    analysis: Expr | None

    def rule_ids(self) -> tuple[str, ...]:
        return (f"{self.name}/canary", f"{self.name}/stable")


@dataclass(frozen=True)
class Bundle:
    version: str  # content hash of the policy files
    directory: str
    files: tuple[str, ...]
    access: tuple[AccessPolicy, ...]
    moderation: tuple[ModerationPolicy, ...]
    routing: tuple[RoutingPolicy, ...]
    quota: tuple[QuotaPolicy, ...]
    canary: tuple[CanaryPolicy, ...]
    tenants: TenantRegistry
    env: Environment = field(repr=False)
    backend_env: Environment = field(repr=False)
    # Variables `canary`, `stable`, `now`: the environment rollout analyses are evaluated in.
    analysis_env: Environment | None = field(default=None, repr=False)
    # Identifiers used by any expression: values nobody reads are not converted.
    references: frozenset[str] = frozenset()

    def policies(self) -> tuple[Policy, ...]:
        return (*self.access, *self.moderation, *self.routing, *self.quota, *self.canary)

    def expressions(self) -> tuple[Expr, ...]:
        """Every expression of every policy as written in the files (batches excluded)."""
        found: list[Expr] = []

        def walk(node: object) -> None:
            if isinstance(node, Expr):
                found.append(node)
            elif isinstance(node, tuple | list):
                for item in node:
                    walk(item)
            elif dataclasses.is_dataclass(node) and not isinstance(node, type):
                for spec in dataclasses.fields(node):
                    walk(getattr(node, spec.name))

        walk(self.policies())
        return tuple(found)

    def rule_ids(self) -> tuple[str, ...]:
        return tuple(rule for policy in self.policies() for rule in policy.rule_ids())

    def budget(self, policy: str, limit: str, kind: str) -> tuple[float, Literal["sliding", "fixed"]] | None:
        """Window and algorithm of a counter's budget, if the bundle still has it."""
        for quota in self.quota:
            if quota.name != policy:
                continue
            for candidate in quota.limits:
                if candidate.name == limit:
                    for budget in candidate.budgets:
                        if budget.kind == kind:
                            return budget.window, candidate.algorithm
        return None
