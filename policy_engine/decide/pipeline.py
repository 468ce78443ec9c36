"""The decision pipeline: attributes + telemetry + quota view → Decision, with no side effects.

Stages run in a fixed order, access → moderation → shedding → quota → canary → routing; the
first enforced denial ends the run (deny overrides allow). Policies in dry_run mode are
evaluated in full, but what they would have done is only recorded.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from policy_engine.cel.engine import Activation, CelEvalError, Program
from policy_engine.cel.library import stable_bucket
from policy_engine.decide.activation import MessageBuilder, RequestView, decision_time
from policy_engine.decide.attributes import LlmRequest, RequestAttributes, llm_request, parse_body
from policy_engine.decide.decision import Decision, FiredRule, QuotaCheck
from policy_engine.decide.quota import outcome, quota_headers, token_metadata, without_rate_headers
from policy_engine.decide.secrets import credentials, scrub
from policy_engine.decide.tenants import Tenant
from policy_engine.policy import bundle as b
from policy_engine.policy.schema import OnError
from policy_engine.quota.view import CounterId, NoUsage, QuotaView
from policy_engine.telemetry.snapshot import EMPTY_SNAPSHOT, TelemetrySnapshot

ROUTE_HEADER = "x-pe-route"
TENANT_HEADER = "x-pe-tenant"
FLAGS_HEADER = "x-pe-flags"
TENANT_METADATA = "pe_tenant"
_BUCKETS = 10_000


class _Denied(Exception):
    """Ends the run: an enforced denial."""

    def __init__(self, denial: b.Denial, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(denial.reason)
        self.denial = denial
        self.headers = dict(headers or {})


@dataclass
class _Run:
    values: dict[str, Any]
    activation: Activation
    backends: Mapping[str, Message]
    llm: LlmRequest
    tenant: Tenant
    fired: list[FiredRule] = field(default_factory=list)
    dry_run: list[FiredRule] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    upstream: dict[str, str] = field(default_factory=dict)
    response: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    quota: list[QuotaCheck] = field(default_factory=list)
    canary: dict[str, str] = field(default_factory=dict)
    route: str | None = None
    body: Any = None  # as parse_body read it
    store_settles: bool = False  # Pipeline.decide's


def _policy_error(policy: b.Policy, status: int) -> b.Denial:
    return b.Denial(status, "policy_error", f"policy {policy.name} could not be evaluated")


class Pipeline:
    """Decides requests against one bundle; reuse it (it caches conversions) per bundle."""

    def __init__(self, bundle: b.Bundle) -> None:
        self.bundle = bundle
        self._messages = MessageBuilder()

    def decide(
        self,
        attrs: RequestAttributes,
        telemetry: TelemetrySnapshot = EMPTY_SNAPSHOT,
        quota: QuotaView | None = None,
        canary_weights: Mapping[str, int] | None = None,
        store_settles: bool = False,
    ) -> Decision:
        """The decision for `attrs`. With `store_settles`, the caller settles an allowed
        decision's quota checks in a counter store (`settle`), which writes their headers and
        token metadata from the store's usage: they are not written here from `quota`'s."""
        try:
            return self._decide(attrs, telemetry, quota or NoUsage(), canary_weights or {}, store_settles)
        except Exception as error:  # the last line of defence: every input gets a decision
            return Decision(
                allowed=False,
                status=500,
                reason="internal_error",
                message="the policy decision failed",
                errors=(f"{type(error).__name__}: {error}",),
                bundle_version=self.bundle.version,
            )

    def _decide(
        self,
        attrs: RequestAttributes,
        telemetry: TelemetrySnapshot,
        quota: QuotaView,
        canary_weights: Mapping[str, int],
        store_settles: bool,
    ) -> Decision:
        bundle, messages = self.bundle, self._messages
        body = parse_body(attrs)
        llm = llm_request(attrs, body, "messages" in bundle.references)
        tenant = bundle.tenants.resolve(attrs.headers, attrs.source.principal)
        telemetry_message, backends = messages.telemetry(telemetry)
        with_body = "body" in bundle.references
        values: dict[str, Any] = {
            "request": RequestView(attrs, body, with_body),
            "llm": llm,
            "source": attrs.source,
            "destination": attrs.destination,
            "tenant": tenant,
            "telemetry": telemetry_message,
            "now": decision_time(attrs),
            "context": dict(attrs.context),
            "canary": {},
        }

        def engine_values() -> dict[str, Any]:
            # Only for expressions the translation leaves to the engine (see activation.py).
            return {
                **values,
                "request": messages.request(attrs, body, with_body),
                "llm": messages.llm(llm, "messages" in bundle.references),
                "source": messages.peer(attrs.source),
                "destination": messages.peer(attrs.destination),
                "tenant": messages.tenant(tenant),
            }

        run = _Run(
            values,
            bundle.env.activation(values, engine_values),
            backends,
            llm,
            tenant,
            body=body,
            store_settles=store_settles,
        )
        if tenant.authenticated:
            run.upstream[TENANT_HEADER] = tenant.id
        try:
            self._access(run)
            self._moderation(run)
            self._shedding(run)
            self._quota(run, quota)
            self._canary(run, canary_weights)
            self._routing(run)
        except _Denied as denied:
            # The quota stage's headers describe an admission this denial undoes (and in the
            # service, a view of no usage, before the store settles): only a quota denial,
            # whose own headers these are, carries any.
            run.response = {**without_rate_headers(run.response), **denied.headers}
            return self._finish(run, allowed=False, denial=denied.denial)
        return self._finish(run, allowed=True, denial=None)

    # --- evaluation helpers ---------------------------------------------------------------

    def _eval(
        self, run: _Run, policy: b.Policy, rule: str, expr: b.Expr, act: Activation | None = None
    ) -> Any:
        """The value, or None after recording a run-time error."""
        try:
            return expr.program.eval(run.activation if act is None else act)
        except CelEvalError as error:
            self._error(run, policy, rule, error)
            return None

    def _test(
        self, run: _Run, policy: b.Policy, rule: str, expr: b.Expr, act: Activation | None = None
    ) -> bool | None:
        """A condition's value, or None after recording a run-time error."""
        try:
            return expr.program.test(run.activation if act is None else act)
        except CelEvalError as error:
            self._error(run, policy, rule, error)
            return None

    @staticmethod
    def _error(run: _Run, policy: b.Policy, rule: str, error: CelEvalError) -> None:
        run.errors.append(f"{policy.name}/{rule}: {error}")
        run.fired.append(FiredRule(policy.name, rule, "error", policy.dry_run, str(error)))

    def _conditions(
        self, run: _Run, policy: b.Policy, batch: Program | None, rules: Sequence[b.Rule]
    ) -> list[bool | None]:
        """Every rule's condition: one evaluation of the batch, or rule by rule when any errs."""
        if batch is not None:
            try:
                values: list[bool | None] = batch.eval(run.activation)
            except CelEvalError:
                pass  # evaluated again one by one so each error is attributed to its rule
            else:
                for value in values:
                    if value is not True and value is not False:
                        break  # not a bool: one by one, for the error of its rule
                else:
                    return values
        return [self._test(run, policy, rule.name, rule.when) for rule in rules]

    def _applies(self, run: _Run, policy: b.Policy, error_status: int) -> bool:
        if policy.when is None:
            return True
        value = self._test(run, policy, "when", policy.when)
        if value is None:
            self._failed(run, policy, error_status)
            return False
        return value

    def _failed(self, run: _Run, policy: b.Policy, status: int) -> None:
        """A run-time error: the policy's on_error decides."""
        if policy.on_error is OnError.deny:
            self._deny(run, policy, "error", _policy_error(policy, status))

    def _deny(
        self,
        run: _Run,
        policy: b.Policy,
        rule: str,
        denial: b.Denial,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if policy.dry_run:
            run.dry_run.append(FiredRule(policy.name, rule, "deny", True, f"{denial.status} {denial.reason}"))
            return
        raise _Denied(denial, headers)

    def _fire(self, run: _Run, policy: b.Policy, rule: str, effect: str, detail: str = "") -> None:
        run.fired.append(FiredRule(policy.name, rule, effect, policy.dry_run, detail))

    # --- stages ---------------------------------------------------------------------------

    def _access(self, run: _Run) -> None:
        for policy in self.bundle.access:
            if not self._applies(run, policy, 403):
                continue
            allowed = False
            denial: tuple[str, b.Denial] | None = None
            values = self._conditions(run, policy, policy.batch, policy.rules)
            for rule, value in zip(policy.rules, values, strict=True):
                if value is None:
                    if policy.on_error is OnError.deny and denial is None:
                        denial = (rule.name, _policy_error(policy, 403))
                    continue
                if value:
                    self._fire(run, policy, rule.name, rule.effect)
                    if rule.effect == "allow":
                        allowed = True
                    elif denial is None:
                        denial = (rule.name, rule.denial)
            if denial is None and not allowed and policy.default == "deny":
                self._fire(run, policy, "default", "deny")
                denial = ("default", policy.default_denial)
            if denial is not None:
                self._deny(run, policy, denial[0], denial[1])

    def _moderation(self, run: _Run) -> None:
        for policy in self.bundle.moderation:
            if not self._applies(run, policy, 400):
                continue
            values = self._conditions(run, policy, policy.batch, policy.rules)
            for rule, value in zip(policy.rules, values, strict=True):
                if value is None:
                    self._failed(run, policy, 400)
                elif value:
                    self._fire(run, policy, rule.name, rule.action)
                    if rule.action == "deny":
                        self._deny(run, policy, rule.name, rule.denial)
                    elif not policy.dry_run:
                        run.flags.append(f"{policy.name}/{rule.name}")

    def _shedding(self, run: _Run) -> None:
        for policy in self.bundle.routing:
            if not policy.shedding or not self._applies(run, policy, 503):
                continue
            values = self._conditions(run, policy, policy.shed_batch, policy.shedding)
            for rule, value in zip(policy.shedding, values, strict=True):
                if value is None:
                    self._failed(run, policy, 503)
                elif value:
                    self._fire(run, policy, rule.name, "shed")
                    retry = {"retry-after": str(math.ceil(rule.retry_after))}
                    self._deny(run, policy, rule.name, rule.denial, retry)

    def _quota(self, run: _Run, view: QuotaView) -> None:
        for policy in self.bundle.quota:
            if not self._applies(run, policy, 500):
                continue
            for limit, key in zip(policy.limits, self._quota_keys(run, policy), strict=True):
                if key is None:
                    continue
                checks = [self._check(run, policy, limit, budget, key, view) for budget in limit.budgets]
                exceeded = [c for c in checks if c.exceeded]
                self._fire(run, policy, limit.name, "deny" if exceeded else "quota", key)
                if not policy.dry_run:
                    run.quota.extend(checks)
                if exceeded:
                    # Every budget checked so far (a dry-run policy's refusal raises nothing).
                    self._deny(run, policy, limit.name, limit.denial, quota_headers(run.quota, exceeded))
        if not run.store_settles:
            run.response.update(quota_headers(run.quota))

    def _quota_keys(self, run: _Run, policy: b.QuotaPolicy) -> list[str | None]:
        """The counter key of each limit that applies (None where it does not)."""
        if policy.batch is not None:
            try:
                values = policy.batch.eval(run.activation)
            except CelEvalError:
                pass  # one by one below, so each error is attributed to its limit
            else:
                keys: list[str | None] = []
                for value in values:  # per limit: [] where it does not apply, else [key]
                    if type(value) is not list:
                        break
                    if not value:
                        keys.append(None)
                    elif len(value) == 1 and type(value[0]) is str:
                        keys.append(value[0])
                    else:
                        break
                else:
                    return keys
        keys = []
        for limit in policy.limits:
            keys.append(None)
            value = self._test(run, policy, limit.name, limit.when)
            if value is None:
                self._failed(run, policy, 500)
            elif value:
                key = self._eval(run, policy, limit.name, limit.key)
                if isinstance(key, str):
                    keys[-1] = key
                else:
                    if key is not None:
                        run.errors.append(f"{policy.name}/{limit.name}: key must be a string")
                    self._failed(run, policy, 500)
        return keys

    def _check(
        self, run: _Run, policy: b.Policy, limit: b.QuotaLimit, budget: b.Budget, key: str, view: QuotaView
    ) -> QuotaCheck:
        counter = CounterId(policy.name, limit.name, budget.kind, key)
        usage = view.usage(counter, budget.window)
        llm = run.llm
        kind = budget.kind
        # Tokens are charged after the response; the estimate is reserved now.
        if kind == "requests":
            cost = 1
        elif kind == "input_tokens":
            cost = max(llm.prompt_tokens, 0)
        else:
            # Without a limit the backend may generate up to its context length: the policy says
            # what to reserve for that (and a stream that reports no usage is charged it).
            output = (llm.max_tokens or budget.unlimited_output) * llm.choices
            cost = min(max(output if kind == "output_tokens" else llm.prompt_tokens + output, 0), 2**62)
        exceeded, remaining = outcome(budget.kind, budget.limit, usage.used, cost)
        return QuotaCheck(
            counter=str(counter),
            policy=policy.name,
            limit_name=limit.name,
            kind=budget.kind,
            key=key,
            limit=budget.limit,
            window=budget.window,
            algorithm=limit.algorithm,
            used=usage.used,
            cost=cost,
            remaining=remaining,
            reset_s=usage.reset_s,
            exceeded=exceeded,
            status=limit.denial.status,
            message=limit.denial.message,
            fail_open=policy.on_error is OnError.allow,
        )

    def _canary(self, run: _Run, weights: Mapping[str, int]) -> None:
        for policy in self.bundle.canary:
            if not self._applies(run, policy, 500):
                continue
            eligible = self._test(run, policy, "eligible", policy.eligible)
            if eligible is None:
                self._failed(run, policy, 500)
                eligible = False
            variant = "stable"
            if eligible:
                key = self._eval(run, policy, "sticky_key", policy.sticky_key)
                if isinstance(key, str):
                    if not key:
                        # No identity to stick to: each such request is assigned on its own, so
                        # together they follow the weight instead of sharing one bucket.
                        key = "request:" + (run.values["request"].id or secrets.token_hex(8))
                    weight = max(0, min(100, weights.get(policy.name, policy.weight)))
                    bucket = stable_bucket(f"{policy.name}:{key}", _BUCKETS)
                    variant = "canary" if bucket < weight * (_BUCKETS // 100) else "stable"
                else:
                    self._failed(run, policy, 500)
            backend = policy.canary if variant == "canary" else policy.stable
            self._fire(run, policy, variant, variant, backend)
            if not policy.dry_run:
                run.canary[policy.name] = variant
                if eligible:
                    # Only requests in the rollout carry the header: a mesh route that splits on
                    # it must never see an ineligible request.
                    run.upstream[policy.header] = backend
        if run.canary:
            run.values["canary"].update(run.canary)

    def _routing(self, run: _Run) -> None:
        for policy in self.bundle.routing:
            if not policy.routes or not self._applies(run, policy, 503):
                continue
            values = self._conditions(run, policy, policy.route_batch, policy.routes)
            for route, value in zip(policy.routes, values, strict=True):
                if value is None:
                    self._failed(run, policy, 503)
                    continue
                if not value:
                    continue
                backend = self._pick(run, policy, route)
                if backend is None:
                    self._fire(run, policy, route.name, "deny", "no eligible backend")
                    retry = {"retry-after": str(math.ceil(policy.unavailable_retry_after))}
                    self._deny(run, policy, route.name, policy.unavailable, retry)
                    break
                self._fire(run, policy, route.name, "route", backend)
                headers = {}
                for name, expr in route.headers:
                    errors = len(run.errors)
                    header_value = self._eval(run, policy, route.name, expr)
                    if isinstance(header_value, str):
                        headers[name] = header_value
                        continue
                    if header_value is None and len(run.errors) == errors:
                        continue  # null: the header is left out (the reference says so)
                    if header_value is not None:
                        run.errors.append(f"{policy.name}/{route.name}: header {name} is not a string")
                    # A header the mesh may route or bill on is part of the decision: on_error
                    # decides, as for a condition, rather than sending the request without it.
                    self._failed(run, policy, 503)
                if policy.dry_run:
                    run.dry_run.append(FiredRule(policy.name, route.name, "route", True, backend))
                    break
                run.route = backend
                run.upstream[ROUTE_HEADER] = backend
                run.upstream.update(headers)
                return

    def _pick(self, run: _Run, policy: b.RoutingPolicy, route: b.Route) -> str | None:
        """The lowest-scoring eligible candidate, else the best eligible fallback (fallbacks
        are only evaluated when no candidate is eligible)."""
        for names, batch in ((route.candidates, route.pick), (route.fallback, route.pick_fallback)):
            eligible = self._eligible(run, policy, route, names, batch)
            if eligible:
                return _choose(eligible, route, run.values["request"].id)
        return None

    def _eligible(
        self, run: _Run, policy: b.RoutingPolicy, route: b.Route, names: Sequence[str], batch: Program | None
    ) -> list[tuple[float, str]]:
        """The eligible backends among ``names`` with their scores, in order."""
        if batch is not None:
            try:
                scores = batch.eval(run.activation)
            except CelEvalError:
                pass  # some backend's expression failed: score them one by one below
            else:
                return [(s[0], name) for name, s in zip(names, scores, strict=True) if s and s[0] == s[0]]
        eligible = []
        for name in names:
            message = run.backends.get(name) or self._messages.unknown_backend(name)
            act = self.bundle.backend_env.activation(
                {**run.values, "backend": message},
                lambda message=message: {**run.activation.engine_values(), "backend": message},  # type: ignore[misc]
            )
            if not self._test(run, policy, route.name, route.require, act):
                continue
            score = self._eval(run, policy, route.name, route.score, act) if route.score else 0.0
            if isinstance(score, bool) or not isinstance(score, int | float) or score != score:
                continue
            eligible.append((float(score), name))
        return eligible

    def _scrubbed(self, errors: list[str], request: Any) -> tuple[str, ...]:
        """Error messages quote the values they failed on: never a credential of the request."""
        secrets = credentials(request.headers, request.query, self.bundle.tenants.key_headers)
        return tuple(scrub(error, secrets) for error in errors)

    def _finish(self, run: _Run, allowed: bool, denial: b.Denial | None) -> Decision:
        if run.flags:
            run.upstream[FLAGS_HEADER] = ",".join(run.flags)
        metadata: dict[str, Any] = {}
        if allowed:
            metadata = {} if run.store_settles else token_metadata(run.quota)
            if run.tenant.id:
                metadata[TENANT_METADATA] = run.tenant.id
        return Decision(
            allowed=allowed,
            status=200 if denial is None else denial.status,
            reason="" if denial is None else denial.reason,
            message="" if denial is None else denial.message,
            route=run.route if allowed else None,
            tenant=run.tenant.id,
            upstream_headers=run.upstream if allowed else {},
            response_headers=run.response,
            dynamic_metadata=metadata,
            fired=tuple(run.fired),
            dry_run=tuple(run.dry_run),
            errors=self._scrubbed(run.errors, run.values["request"]) if run.errors else (),
            quota=tuple(run.quota),
            canary=run.canary,
            bundle_version=self.bundle.version,
            llm=run.llm,
            request_body=run.body,
        )


def _choose(eligible: list[tuple[float, str]], route: b.Route, request_id: str) -> str:
    """The best score (the first on ties); with `explore`, sometimes another eligible backend,
    so the statistics of backends that lost stay fresh and a recovered one is seen again."""
    best = min(range(len(eligible)), key=lambda i: eligible[i][0])
    exploring = route.explore > 0 and len(eligible) > 1 and request_id
    if exploring and stable_bucket(f"{route.name}:{request_id}", _BUCKETS) < route.explore * _BUCKETS:
        others = [name for i, (_, name) in enumerate(eligible) if i != best]
        return others[stable_bucket(f"{request_id}:{route.name}", len(others))]
    return eligible[best][1]
