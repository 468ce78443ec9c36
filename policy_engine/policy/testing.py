"""Policy unit tests (`*_test.yaml`): inputs → expected decision, with per-rule coverage."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from policy_engine.decide.attributes import Peer, RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.decide.tenants import FixedTenant, Tenant, resolved_tenant
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import is_hidden, is_test_file
from policy_engine.policy.schema import Name, TenantEntry
from policy_engine.policy.source import Document, Issue, Position, SourceError, decode, parse_documents
from policy_engine.quota.view import StaticUsage
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    method: str = "POST"
    path: str = "/v1/chat/completions"
    host: str = "ai.example.com"
    scheme: str = "https"
    protocol: str = "HTTP/1.1"
    id: str = "test-request"
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = Field(None, description="JSON body as YAML; serialised for the request.")
    raw_body: str | None = Field(None, description="Body bytes as text, used as they are.")
    truncated: bool = False
    size: int = -1


class PeerInput(_Strict):
    principal: str = ""
    address: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


def _backend_input() -> type[BaseModel]:
    """BackendStats as a strict input model: every telemetry field, named once (in BackendStats)."""
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(BackendStats):
        if spec.name == "name":
            continue  # the key of the backends map
        if spec.default_factory is not dataclasses.MISSING:
            fields[spec.name] = (dict[str, str], Field(default_factory=dict))
        else:
            fields[spec.name] = (spec.type, spec.default)
    model: type[BaseModel] = create_model("BackendInput", __base__=_Strict, **fields)
    return model


if TYPE_CHECKING:
    BackendInput = BaseModel
else:
    BackendInput = _backend_input()


class TenantInput(_Strict):
    """The tenant the request resolves to, in place of the policies' TenantSets: a TenantSet
    entry's fields, and how the request proved it. For policies whose tenants live elsewhere
    (the chart's `tenants` values), and for rules on a tier or label no example key has."""

    id: Name
    tier: str = "free"
    models: list[str] = Field(default_factory=lambda: ["*"], description="Allowed models (globs).")
    labels: dict[str, str] = Field(default_factory=dict)
    credential: Literal["api_key", "principal"] = "api_key"
    key_id: str = Field("", description="The API key's id (tenant.key_id).")

    def resolved(self) -> Tenant:
        entry = TenantEntry(id=self.id, tier=self.tier, models=self.models, labels=self.labels)
        return resolved_tenant(entry, self.credential, self.key_id)


class UsageInput(_Strict):
    """A counter's usage so far, by kind."""

    requests: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None


class TelemetryInput(_Strict):
    load: float | None = None
    backends: dict[str, BackendInput] = Field(default_factory=dict)


class DecisionInput(_Strict):
    """Everything one decision is made on; also the `eval --input` file format."""

    request: RequestInput = Field(default_factory=RequestInput)
    source: PeerInput = Field(default_factory=PeerInput)
    destination: PeerInput = Field(default_factory=PeerInput)
    context: dict[str, str] = Field(default_factory=dict)
    telemetry: TelemetryInput = Field(default_factory=TelemetryInput)
    quota: dict[str, UsageInput] = Field(
        default_factory=dict, description="Usage so far by 'policy/limit' → {requests|input_tokens|...: n}."
    )
    canary_weights: dict[str, int] = Field(default_factory=dict)
    tenant: TenantInput | None = Field(
        None,
        description="Who the request resolves to, whatever its key or principal (unset: the TenantSets).",
    )
    time: datetime = Field(default_factory=lambda: datetime(2026, 1, 1, 12, 0, tzinfo=UTC))

    def attributes(self) -> RequestAttributes:
        r = self.request
        if r.raw_body is not None:
            body = r.raw_body.encode()
        elif r.body is not None:
            body = json.dumps(r.body).encode()
        else:
            body = b""
        when = self.time if self.time.tzinfo else self.time.replace(tzinfo=UTC)
        return RequestAttributes(
            method=r.method,
            path=r.path,
            host=r.host,
            scheme=r.scheme,
            protocol=r.protocol,
            id=r.id,
            headers={k.lower(): v for k, v in r.headers.items()},
            body=body,
            body_truncated=r.truncated,
            size=r.size,
            time=when,
            source=Peer(self.source.principal, self.source.address, self.source.labels),
            destination=Peer(self.destination.principal, self.destination.address, self.destination.labels),
            context=self.context,
        )

    def snapshot(self) -> TelemetrySnapshot:
        backends = {
            name: BackendStats(name=name, **b.model_dump()) for name, b in self.telemetry.backends.items()
        }
        return TelemetrySnapshot(backends=backends, load=self.telemetry.load)

    def decide(self, pipeline: Pipeline) -> Decision:
        if self.tenant is not None:
            bundle = pipeline.bundle
            stub = FixedTenant(self.tenant.resolved(), bundle.tenants.key_headers)
            pipeline = Pipeline(replace(bundle, tenants=stub))
        return pipeline.decide(
            self.attributes(),
            self.snapshot(),
            StaticUsage({name: used.model_dump(exclude_none=True) for name, used in self.quota.items()}),
            self.canary_weights,
        )


class Expect(_Strict):
    allowed: bool | None = None
    status: int | None = None
    reason: str | None = None
    route: str | None = Field(None, description="Expected route; 'none' for no route.")
    tenant: str | None = None
    headers: dict[str, str | None] = Field(default_factory=dict, description="Upstream; null = absent.")
    response_headers: dict[str, str | None] = Field(default_factory=dict)
    fired: list[str] = Field(default_factory=list, description="policy/rule ids that must fire.")
    not_fired: list[str] = Field(default_factory=list)
    dry_run: list[str] = Field(default_factory=list, description="Dry-run findings (policy/rule).")
    canary: dict[str, str] = Field(default_factory=dict)
    errors: bool | None = Field(None, description="Whether run-time expression errors occurred.")
    body_contains: str | None = None


class TestCase(_Strict):
    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    expect: Expect


class TestFile(_Strict):
    name: str = ""
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Input merged under each test's input."
    )
    tests: list[TestCase] = Field(min_length=1)


def schema_of_test_files() -> dict[str, Any]:
    """The JSON Schema of test files, for editors. A test's `input` and the file's `defaults`
    are merged before they are read as a decision input, so each is a partial one: the fields
    of DecisionInput, unknown ones refused, none required."""
    schema = TestFile.model_json_schema()
    partial = DecisionInput.model_json_schema()
    definitions: dict[str, Any] = {**partial.pop("$defs", {}), "DecisionInput": partial}
    for definition in definitions.values():
        definition.pop("required", None)
    schema["$defs"].update(definitions)
    reference = {"$ref": "#/$defs/DecisionInput"}
    schema["$defs"]["TestCase"]["properties"]["input"] = {
        **reference,
        "description": "Merged over the defaults.",
    }
    schema["properties"]["defaults"] = {**reference, "description": "Input merged under each test's input."}
    return schema


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class CaseResult:
    file: str
    name: str
    position: Position
    failures: list[str]
    decision: Decision | None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class TestReport:
    results: list[CaseResult] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    coverage: Counter[str] = field(default_factory=Counter)
    rules: tuple[str, ...] = ()

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.passed

    @property
    def uncovered(self) -> list[str]:
        return [r for r in self.rules if self.coverage[r] == 0]

    @property
    def ok(self) -> bool:
        return not self.issues and self.failed == 0 and bool(self.results)


def compare(decision: Decision, expect: Expect) -> list[str]:
    failures: list[str] = []

    def check(what: str, actual: Any, wanted: Any) -> None:
        if wanted is not None and actual != wanted:
            failures.append(f"{what}: expected {wanted!r}, got {actual!r}")

    check("allowed", decision.allowed, expect.allowed)
    check("status", decision.status, expect.status)
    check("reason", decision.reason, expect.reason)
    check("tenant", decision.tenant, expect.tenant)
    if expect.route is not None:
        check("route", decision.route or "none", expect.route)
    for label, actual_headers, wanted_headers in (
        ("header", decision.upstream_headers, expect.headers),
        ("response header", decision.response_headers, expect.response_headers),
    ):
        for name, value in wanted_headers.items():
            actual = actual_headers.get(name.lower())
            if actual != value:
                failures.append(f"{label} {name}: expected {value!r}, got {actual!r}")
    fired = {f.id for f in decision.fired if f.effect != "error"}
    for rule in expect.fired:
        if rule not in fired:
            failures.append(f"expected {rule} to fire; fired: {sorted(fired) or 'nothing'}")
    for rule in expect.not_fired:
        if rule in fired:
            failures.append(f"expected {rule} not to fire")
    findings = {f.id for f in decision.dry_run}
    for rule in expect.dry_run:
        if rule not in findings:
            failures.append(f"expected dry-run finding {rule}; found: {sorted(findings) or 'nothing'}")
    for policy, variant in expect.canary.items():
        check(f"canary {policy}", decision.canary.get(policy), variant)
    if expect.errors is not None and bool(decision.errors) != expect.errors:
        failures.append(f"errors: expected {expect.errors}, got {list(decision.errors)}")
    if expect.body_contains is not None and expect.body_contains not in (decision.body or ""):
        failures.append(f"body: expected to contain {expect.body_contains!r}, got {decision.body!r}")
    return failures


def test_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and is_test_file(p) and not is_hidden(p, directory)
    )


@dataclass(frozen=True)
class KnownNames:
    """The names a test may give, from the bundle under test: read once per run."""

    rules: frozenset[str]
    limits: frozenset[str]
    canaries: frozenset[str]

    @classmethod
    def of(cls, bundle: Bundle) -> KnownNames:
        rules = set(bundle.rule_ids())
        rules.update(f"{policy.name}/error" for policy in bundle.policies())  # on_error: deny's denial
        rules.update(f"{policy.name}/default" for policy in bundle.access)
        limits = {rule for policy in bundle.quota for rule in policy.rule_ids()}
        return cls(frozenset(rules), frozenset(limits), frozenset(policy.name for policy in bundle.canary))

    def unknown(self, decision_input: DecisionInput, expect: Expect) -> list[str]:
        """Names a test gives that the policies do not have: a misspelled rule would pass as
        `not_fired`, and misspelled usage would be silently ignored."""
        found: list[str] = []
        for field_name, names in (
            ("fired", expect.fired),
            ("not_fired", expect.not_fired),
            ("dry_run", expect.dry_run),
        ):
            found += [
                f"expect.{field_name}: no rule {name!r} in the policies"
                for name in names
                if name not in self.rules
            ]
        found += [
            f"expect.canary: no CanaryPolicy {name!r}" for name in expect.canary if name not in self.canaries
        ]
        found += [
            f"input quota: no quota limit {name!r} in the policies"
            for name in decision_input.quota
            if name not in self.limits
        ]
        found += [
            f"input canary_weights: no CanaryPolicy {name!r}"
            for name in decision_input.canary_weights
            if name not in self.canaries
        ]
        return found


def _input_position(doc: Document, index: int, loc: tuple[int | str, ...], kind: str) -> Position:
    """Where a field of a test's input is written: in the test, or in the file's defaults."""

    def written(base: tuple[int | str, ...]) -> int:
        return max((n for n in range(len(loc) + 1) if (*base, *loc[:n]) in doc.nodes), default=-1)

    case: tuple[int | str, ...] = ("tests", index, "input")
    base = ("defaults",) if written(("defaults",)) > written(case) else case
    return doc.problem_position((*base, *loc), kind)


def run_tests(bundle: Bundle, directory: Path, name_filter: str = "") -> TestReport:
    report = TestReport(rules=bundle.rule_ids())
    pipeline = Pipeline(bundle)
    known = KnownNames.of(bundle)
    for path in test_files(directory):
        shown = str(path)
        try:
            documents = list(parse_documents(shown, decode(shown, path.read_bytes())))
        except SourceError as error:
            report.issues.extend(error.issues)
            continue
        for doc in documents:
            try:
                suite = TestFile.model_validate(doc.data)
            except ValidationError as error:
                for item in error.errors():
                    path_in_doc = tuple(p for p in item["loc"])
                    report.issues.append(
                        Issue(doc.position(path_in_doc), f"{'.'.join(map(str, path_in_doc))}: {item['msg']}")
                    )
                continue
            for index, case in enumerate(suite.tests):
                if name_filter and name_filter not in case.name:
                    continue
                position = doc.position(("tests", index))
                try:
                    decision_input = DecisionInput.model_validate(deep_merge(suite.defaults, case.input))
                except ValidationError as error:
                    failures = [
                        f"{_input_position(doc, index, e['loc'], e['type'])}: "
                        f"input {'.'.join(map(str, e['loc']))}: {e['msg']}"
                        for e in error.errors()
                    ]
                    report.results.append(CaseResult(shown, case.name, position, failures, None))
                    continue
                decision = decision_input.decide(pipeline)
                for fired in decision.fired:
                    if fired.effect != "error":
                        report.coverage[fired.id] += 1
                failures = known.unknown(decision_input, case.expect) + compare(decision, case.expect)
                report.results.append(CaseResult(shown, case.name, position, failures, decision))
    return report
