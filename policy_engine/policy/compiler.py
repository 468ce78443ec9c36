"""Policy directory → compiled Bundle, or every problem in it at once, each at file:line:col."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from policy_engine.cel import library
from policy_engine.cel.engine import CelCompileError, Environment, FunctionDef, Program
from policy_engine.cel.functions import library_functions, literal_problem
from policy_engine.cel.schema import BACKEND_VARIABLE, PACKAGE, VARIABLES, Variable
from policy_engine.decide.tenants import TenantRegistry
from policy_engine.policy import bundle as b
from policy_engine.policy import schema as s
from policy_engine.policy.source import (
    Document,
    Issue,
    Position,
    SourceError,
    decode,
    parse_documents,
)
from policy_engine.policy.source import (
    Path as NodePath,
)

ANALYSIS_VARIABLES = (
    Variable("canary", "Backend", "Telemetry of the canary backend."),
    Variable("stable", "Backend", "Telemetry of the stable backend."),
    Variable("now", "timestamp", "Analysis time."),
)
_TERM_LIST_REF = re.compile(
    r"terms\.(?:any|find)\(\s*[^,()]*(?:\([^()]*\))?[^,()]*,\s*(['\"])([^'\"]*)\1\s*\)"
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


def _library_calls(documents: Sequence[tuple[Document, Any]], functions: Sequence[FunctionDef]) -> int:
    """An upper bound of the distinct library calls in the files: the size of the hoisting pool."""
    texts = {id(doc.text_lines): "\n".join(doc.text_lines) for doc, _ in documents}
    pattern = re.compile("|".join(re.escape(f.name) + r"\s*\(" for f in functions) or "$^")
    return sum(len(pattern.findall(text)) for text in texts.values())


NO_ACCESS_POLICY = (
    "no AccessPolicy: every request would be allowed; write one (a rule `{name: all, effect: allow, "
    "when: 'true'}` allows every request on purpose)"
)


def _one_line(source: str) -> str:
    """An expression quoted in a one-line error message."""
    return " ".join(source.split())


class BundleError(Exception):
    def __init__(self, issues: list[Issue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.position, i.message))
        super().__init__("\n".join(str(i) for i in self.issues))


def is_test_file(path: Path) -> bool:
    return path.name.endswith(("_test.yaml", "_test.yml"))


def is_hidden(path: Path, directory: Path) -> bool:
    """Under a hidden directory: a mounted ConfigMap keeps its files in `..<timestamp>/` next to
    the symlinks a reader should use, so reading both would load every policy twice."""
    return any(part.startswith(".") for part in path.relative_to(directory).parts)


def policy_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise BundleError([Issue(Position(str(directory), 1, 1), "not a directory")])
    files = [
        p
        for p in directory.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.is_file() and not is_hidden(p, directory)
    ]
    return sorted(
        (p for p in files if not is_test_file(p)), key=lambda p: p.relative_to(directory).as_posix()
    )


def _validation_issues(doc: Document, error: ValidationError) -> list[Issue]:
    data = doc.data if isinstance(doc.data, dict) else {}
    metadata = data.get("metadata")
    policy = str(metadata.get("name", "")) if isinstance(metadata, dict) else ""
    issues = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if loc and loc[0] == data.get("kind"):
            loc = loc[1:]  # pydantic prefixes the discriminator's tag
        path: NodePath = tuple(str(p) if not isinstance(p, int) else p for p in loc)
        rule = _rule_name(data, path)
        if item["type"] == "extra_forbidden":
            position = doc.key_position(path)
            message = f"unknown field {path[-1]!r}" + (
                f" in {'.'.join(map(str, path[:-1]))}" if path[:-1] else ""
            )
        else:
            position = doc.position(path)
            where = ".".join(map(str, path))
            message = f"{where}: {item['msg']}" if where else item["msg"]
        issues.append(Issue(position, message, policy, rule))
    return issues


def _rule_name(data: Any, path: NodePath) -> str:
    if len(path) >= 3 and path[0] == "spec" and isinstance(path[2], int):
        items = data.get("spec", {}).get(path[1]) if isinstance(data.get("spec"), dict) else None
        if isinstance(items, list) and path[2] < len(items) and isinstance(items[path[2]], dict):
            return str(items[path[2]].get("name", f"{path[1]}[{path[2]}]"))
    return ""


class _Compiler:
    def __init__(self, documents: Sequence[tuple[Document, s.PolicyDocument]]) -> None:
        self.documents = documents
        self.issues: list[Issue] = []
        self.term_lists: dict[str, library.TermMatcher] = {}
        for doc, model in documents:
            if isinstance(model, s.ModerationPolicy):
                for name, terms in model.spec.term_lists.items():
                    if name in self.term_lists:
                        position = doc.key_position(("spec", "term_lists", name))
                        self.issues.append(
                            Issue(position, f"term list {name!r} is defined twice", model.metadata.name)
                        )
                    self.term_lists[name] = library.TermMatcher(terms)
        functions = library_functions(self.term_lists)
        slots = _library_calls(documents, functions)
        self.env = Environment(functions, VARIABLES, slots)
        self.backend_env = Environment(functions, (*VARIABLES, BACKEND_VARIABLE), slots)
        self.analysis_env = Environment(functions, ANALYSIS_VARIABLES, slots)
        self.references: set[str] = set()

    def expr(
        self,
        doc: Document,
        path: NodePath,
        source: str,
        result: str,
        policy: str,
        rule: str = "",
        env: Environment | None = None,
    ) -> b.Expr | None:
        position = doc.position(path)
        try:
            program = (env or self.env).compile(source, result)
        except CelCompileError as error:
            where = doc.expression_position(path, error.line, error.column)
            self.issues.append(
                Issue(where, f"{error.message} in `{path[-1]}`: {_one_line(source)}", policy, rule)
            )
            return None
        if (
            "canary" in program.variables()
            and (env or self.env) is not self.analysis_env
            and tuple(path[:2]) != ("spec", "routes")
        ):
            # The canary stage fills `canary` after access, moderation, shedding and quota ran.
            where = doc.expression_position(path, 1, 1)
            message = "the `canary` variable is only known in routing routes (the canary stage runs first)"
            self.issues.append(Issue(where, message, policy, rule))
            return None
        report = program.cost()
        bad_patterns = filter(None, map((env or self.env).pattern_error, report.patterns))
        problem = report.problem or next((f"bad matches() pattern: {e}" for e in bad_patterns), None)
        problem = problem or next(filter(None, (literal_problem(*call) for call in report.literals)), None)
        if problem is not None:
            where = doc.expression_position(path, 1, 1)
            self.issues.append(Issue(where, f"{problem} in `{path[-1]}`: {_one_line(source)}", policy, rule))
            return None
        for match in _TERM_LIST_REF.finditer(source):
            if match.group(2) not in self.term_lists:
                where = doc.expression_position(path, 1, match.start(2) + 1)
                self.issues.append(Issue(where, f"no term list named {match.group(2)!r}", policy, rule))
        self.references.update(_IDENTIFIER.findall(source))
        return b.Expr(program, position)

    def batch(self, sources: Sequence[str]) -> Program | None:
        """Many expressions as one list expression: one call into the engine instead of many."""
        if not sources:
            return None
        try:
            # Newlines keep a trailing `// comment` of one part from swallowing the next.
            return self.env.compile("[" + ", ".join(f"(\n{src}\n)" for src in sources) + "]")
        except CelCompileError:
            return None  # never expected once each part compiled; the per-rule path still works

    def pick(self, route: b.Route, names: Sequence[str]) -> Program | None:
        if not names:
            return None
        parts = []
        for name in names:
            literal = json.dumps(name)
            backend = (
                f"{literal} in telemetry.backends ? telemetry.backends[{literal}] : "
                f"{PACKAGE}.Backend{{name: {literal}, stale: true}}"
            )
            score = f"double(\n{route.score.source}\n)" if route.score else "0.0"
            parts.append(f"cel.bind(backend, {backend}, (\n{route.require.source}\n) ? [{score}] : [])")
        return self.batch(parts)

    def compile(self, directory: Path, files: Sequence[Path], digest: str, deciding: bool) -> b.Bundle:
        access: list[b.AccessPolicy] = []
        moderation: list[b.ModerationPolicy] = []
        routing: list[b.RoutingPolicy] = []
        quota: list[b.QuotaPolicy] = []
        canary: list[b.CanaryPolicy] = []
        tenant_sets: list[s.TenantSet] = []
        names: dict[str, Position] = {}
        tenants: dict[str, Position] = {}
        principals: dict[str, Position] = {}
        for doc, model in self.documents:
            name = model.metadata.name
            here = doc.position(("metadata", "name"))
            if name in names:
                self.issues.append(Issue(here, f"policy name already used at {names[name]}", name))
            names.setdefault(name, here)
            if isinstance(model, s.TenantSet):
                self._tenants(doc, model, tenants, principals)
                tenant_sets.append(model)
                continue
            compiled = self._policy(doc, model)
            if compiled is None:
                continue
            for bucket, kind in (
                (access, b.AccessPolicy),
                (moderation, b.ModerationPolicy),
                (routing, b.RoutingPolicy),
                (quota, b.QuotaPolicy),
                (canary, b.CanaryPolicy),
            ):
                if isinstance(compiled, kind):
                    bucket.append(compiled)  # type: ignore[arg-type]
        if deciding and not access and not self.issues:
            # Without one every request would be allowed: an emptied directory, a deleted or
            # half-written access.yaml must not open the gateway (and a reload keeps the last
            # good bundle instead).
            self.issues.append(Issue(Position(str(directory), 0, 0), NO_ACCESS_POLICY))
        if self.issues:
            raise BundleError(self.issues)
        return b.Bundle(
            version=digest,
            directory=str(directory),
            files=tuple(str(f) for f in files),
            access=tuple(access),
            moderation=tuple(moderation),
            routing=tuple(routing),
            quota=tuple(quota),
            canary=tuple(canary),
            tenants=TenantRegistry(tenant_sets),
            env=self.env,
            backend_env=self.backend_env,
            analysis_env=self.analysis_env,
            references=frozenset(self.references),
        )

    def _tenants(
        self, doc: Document, model: s.TenantSet, tenants: dict[str, Position], principals: dict[str, Position]
    ) -> None:
        """Tenant ids and principals are unique across TenantSets: otherwise which entry a
        request resolves to would depend on file order, and a quota keyed on the id would
        count two tenants as one."""
        for i, entry in enumerate(model.spec.tenants):
            here = doc.position(("spec", "tenants", i, "id"))
            if entry.id in tenants:
                self.issues.append(Issue(here, f"tenant {entry.id!r} already defined at {tenants[entry.id]}"))
            tenants.setdefault(entry.id, here)
            for j, principal in enumerate(entry.principals):
                at = doc.position(("spec", "tenants", i, "principals", j))
                if principal in principals:
                    message = f"principal {principal!r} already given to a tenant at {principals[principal]}"
                    self.issues.append(Issue(at, message))
                principals.setdefault(principal, at)

    def _policy(self, doc: Document, model: s.PolicyDocument) -> b.Policy | None:
        name = model.metadata.name
        spec = model.spec
        assert not isinstance(spec, s.TenantSpec)
        errors_before = len(self.issues)
        when = self.expr(doc, ("spec", "when"), spec.when, "bool", name) if spec.when else None
        common: dict[str, Any] = dict(
            name=name,
            kind=model.kind,
            mode=spec.mode,
            on_error=spec.on_error,
            when=when,
            position=doc.position(()),
        )
        result: b.Policy | None = None
        rule_names: dict[str, Position] = {}

        def each(field: str, items: Sequence[T], build: Callable[[NodePath, T], Any]) -> tuple[Any, ...]:
            # A rule's id (policy/rule) names its coverage, findings and, for a quota limit, its
            # counters: two rules of one name would share them.
            for i, item in enumerate(items):
                rule = item.name
                here = doc.position(("spec", field, i, "name"))
                if rule in rule_names:
                    self.issues.append(
                        Issue(here, f"rule name already used at {rule_names[rule]}", name, rule)
                    )
                rule_names.setdefault(rule, here)
            built = [build(("spec", field, i), item) for i, item in enumerate(items)]
            return tuple(x for x in built if x is not None)

        def denial(d: s.Denial | s.ShedRule | s.QuotaLimit) -> b.Denial:
            reason = getattr(d, "reason", "rate_limit_exceeded")
            return b.Denial(d.status, reason, d.message)

        if isinstance(spec, s.AccessSpec):

            def access_rule(path: NodePath, r: s.AccessRule) -> b.AccessRule | None:
                w = self.expr(doc, (*path, "when"), r.when, "bool", name, r.name)
                return b.AccessRule(r.name, w, r.effect, denial(r)) if w else None

            rules = each("rules", spec.rules, access_rule)
            result = b.AccessPolicy(
                **common,
                rules=rules,
                default=spec.default,
                default_denial=b.Denial(spec.default_status, spec.default_reason, spec.default_message),
                batch=self.batch([r.when.source for r in rules]),
            )
        elif isinstance(spec, s.ModerationSpec):

            def moderation_rule(path: NodePath, r: s.ModerationRule) -> b.ModerationRule | None:
                w = self.expr(doc, (*path, "when"), r.when, "bool", name, r.name)
                return b.ModerationRule(r.name, w, r.action, denial(r)) if w else None

            rules = each("rules", spec.rules, moderation_rule)
            batch = self.batch([r.when.source for r in rules])
            result = b.ModerationPolicy(**common, rules=rules, batch=batch)
        elif isinstance(spec, s.RoutingSpec):

            def shed_rule(path: NodePath, r: s.ShedRule) -> b.ShedRule | None:
                w = self.expr(doc, (*path, "when"), r.when, "bool", name, r.name)
                return b.ShedRule(r.name, w, denial(r), r.retry_after) if w else None

            def route(path: NodePath, r: s.Route) -> b.Route | None:
                w = self.expr(doc, (*path, "when"), r.when, "bool", name, r.name)
                req = self.expr(doc, (*path, "require"), r.require, "bool", name, r.name, self.backend_env)
                score = (
                    self.expr(doc, (*path, "score"), r.score, "number", name, r.name, self.backend_env)
                    if r.score
                    else None
                )
                headers = [
                    (h, self.expr(doc, (*path, "headers", h), src, "string", name, r.name))
                    for h, src in r.headers.items()
                ]
                if not w or not req or (r.score and not score) or any(e is None for _, e in headers):
                    return None
                compiled = b.Route(
                    r.name,
                    w,
                    tuple(r.candidates),
                    req,
                    score,
                    tuple(r.fallback),
                    tuple((h, e) for h, e in headers if e is not None),
                    r.explore,
                )
                return dataclasses.replace(
                    compiled,
                    pick=self.pick(compiled, compiled.candidates),
                    pick_fallback=self.pick(compiled, compiled.fallback),
                )

            shedding = each("shedding", spec.shedding, shed_rule)
            routes = each("routes", spec.routes, route)
            result = b.RoutingPolicy(
                **common,
                routes=routes,
                shedding=shedding,
                unavailable=b.Denial(spec.unavailable_status, "no_backend_available", "no backend available"),
                unavailable_retry_after=spec.unavailable_retry_after,
                shed_batch=self.batch([r.when.source for r in shedding]),
                route_batch=self.batch([r.when.source for r in routes]),
            )
        elif isinstance(spec, s.QuotaSpec):

            def limit(path: NodePath, q: s.QuotaLimit) -> b.QuotaLimit | None:
                w = self.expr(doc, (*path, "when"), q.when, "bool", name, q.name)
                key = self.expr(doc, (*path, "key"), q.key, "string", name, q.name)
                budgets: list[b.Budget] = []
                if q.requests:
                    budgets.append(b.Budget("requests", q.requests.limit, q.requests.window))
                if q.tokens:
                    for kind, value in (
                        ("input_tokens", q.tokens.input),
                        ("output_tokens", q.tokens.output),
                        ("total_tokens", q.tokens.total),
                    ):
                        if value is not None:
                            budgets.append(
                                b.Budget(kind, value, q.tokens.window, q.tokens.unlimited_output)  # type: ignore[arg-type]
                            )
                if not w or not key:
                    return None
                return b.QuotaLimit(q.name, w, key, tuple(budgets), q.algorithm, denial(q))

            limits = each("limits", spec.limits, limit)
            batch = self.batch([f"(\n{q.when.source}\n) ? [\n{q.key.source}\n] : []" for q in limits])
            result = b.QuotaPolicy(**common, limits=limits, batch=batch)
        elif isinstance(spec, s.CanarySpec):
            eligible = self.expr(doc, ("spec", "eligible"), spec.eligible, "bool", name)
            sticky = self.expr(doc, ("spec", "sticky_key"), spec.sticky_key, "string", name)
            analysis = None
            if spec.rollout is not None:
                analysis = self.expr(
                    doc,
                    ("spec", "rollout", "analysis"),
                    spec.rollout.analysis,
                    "bool",
                    name,
                    "",
                    self.analysis_env,
                )
            if eligible and sticky:
                result = b.CanaryPolicy(
                    **common,
                    stable=spec.stable,
                    canary=spec.canary,
                    weight=spec.weight,
                    eligible=eligible,
                    sticky_key=sticky,
                    header=spec.header,
                    rollout=spec.rollout,
                    analysis=analysis,
                )
        return result if len(self.issues) == errors_before else None


def _digest(digest: Any, root: Path, path: Path, raw: bytes) -> None:
    digest.update(path.relative_to(root).as_posix().encode() + b"\0" + raw + b"\0")


def content_version(directory: Path) -> str:
    """The version load_bundle would give the directory's files as they are now."""
    digest = hashlib.sha256()
    for path in policy_files(directory):
        _digest(digest, directory, path, path.read_bytes())
    return digest.hexdigest()[:16]


def load_bundle(directory: str | Path, *, deciding: bool = True) -> b.Bundle:
    """Parse, validate and compile a policy directory; BundleError lists every problem.
    `deciding=False` for readers that make no access decision (the canary controller): a
    directory of CanaryPolicies alone is then complete."""
    root = Path(directory)
    files = policy_files(root)
    issues: list[Issue] = []
    documents: list[tuple[Document, s.PolicyDocument]] = []
    digest = hashlib.sha256()
    for path in files:
        shown = str(path)
        raw = path.read_bytes()
        _digest(digest, root, path, raw)
        try:
            parsed = list(parse_documents(shown, decode(shown, raw)))
        except SourceError as error:
            issues.extend(error.issues)
            continue
        for doc in parsed:
            if not isinstance(doc.data, dict):
                issues.append(Issue(doc.position(()), "a policy document must be a mapping"))
                continue
            if doc.data.get("kind") not in s.KINDS:
                where = doc.position(("kind",))
                kinds = ", ".join(s.KINDS)
                issues.append(Issue(where, f"kind must be one of {kinds}, not {doc.data.get('kind')!r}"))
                continue
            try:
                documents.append((doc, s.DOCUMENT_ADAPTER.validate_python(doc.data)))
            except ValidationError as error:
                issues.extend(_validation_issues(doc, error))
    compiler = _Compiler(documents)
    issues.extend(compiler.issues)
    compiler.issues = issues
    return compiler.compile(root, files, digest.hexdigest()[:16], deciding)
