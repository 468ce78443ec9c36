"""Three CEL engines side by side on the example policies: cel-expr-python vs cel-python vs cel (Rust).

Run: .venv/bin/python bench/cel_engines.py [--iterations N] [--policies DIR] [--json FILE]

What it measures, in one process and one run:

* Every CEL expression of the example bundle (policies/*.yaml without *_test.yaml): policy
  `when`, rule `when`, route `require`/`score`/`headers`, quota `key`, canary
  `eligible`/`sticky_key` (canary `analysis` is skipped: it runs on other variables).
* One realistic request: a chat completion with 20 headers (`authorization: Bearer
  sk-globex-pro-key-0002`), model llama-3-70b, user u0, 10 messages of ~200 characters, a
  telemetry snapshot of 5 backends named as in policies/routing.yaml. The attributes are built
  once with the project's own types; every engine gets the same data: protobuf messages from
  `MessageBuilder` for cel-expr-python, and the same values as plain dicts for the others.
* Engines:
  - cel-expr-python (Google's C++ runtime, the project's engine): the bundle's own compiled
    programs, `Environment.activation` and `Program.eval`, exactly as `Pipeline` runs them;
  - cel-python (`celpy`, pure Python, default InterpretedRunner): dicts converted with
    `celpy.json_to_cel`;
  - common-expression-language (`cel`, Rust bindings): dicts put in a `cel.Context`.
  The custom functions (pii.*, terms.*, injection.*, globs.match, net.in_cidr, ...) are the
  project's Python implementations (policy_engine.cel.functions) registered through each
  engine's custom-function API. An engine that cannot call a dotted name such as `pii.card`
  has those expressions recorded as "unsupported"; nothing in the policies is rewritten.
* Correctness: each expression is evaluated once per engine and compared with
  cel-expr-python's result (value and Python type). Compile errors, evaluation errors and
  differing results are counted and listed.
* Speed, median of `--iterations` runs after a warm-up, time.perf_counter_ns:
  - per expression: one evaluation with the input already converted;
  - per request: converting the input for the engine once (cel-expr-python: building the
    messages from the attributes plus the activations; cel-python: json_to_cel; cel: building
    the Context) and then evaluating every expression the engine handles, each once; every
    ratio compares an engine with cel-expr-python on exactly the same expressions.
  All timed loops run interleaved in `--rounds` rounds, so that drift and noise from other
  processes hit every engine alike.
  The telemetry snapshot is converted once per snapshot (as MessageBuilder caches it) for
  cel-expr-python and cel-python; a cel.Context cannot share converted values, so cel converts
  it on every request. `backend` (route require/score) is the first candidate, llama-70b-a100-a.
* A few literal probe expressions show semantic differences between the engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The Rust extension module itself rather than the `cel` package: xds-protos (grpc/envoy
# dependencies) installs its own, empty cel/__init__.py over common-expression-language's,
# which then no longer re-exports Context/compile. `cel.cel` works either way.
import celpy  # noqa: E402
from cel import cel as rust_cel  # noqa: E402
from celpy import celtypes  # noqa: E402
from celpy.adapter import json_to_cel  # noqa: E402
from celpy.celparser import CELParseError  # noqa: E402
from celpy.evaluation import CELEvalError  # noqa: E402

from policy_engine.cel import library  # noqa: E402
from policy_engine.cel.engine import (  # noqa: E402
    CelCompileError,
    Environment,
    FunctionDef,
)
from policy_engine.cel.functions import library_functions  # noqa: E402
from policy_engine.cel.schema import MESSAGES  # noqa: E402
from policy_engine.decide.activation import MessageBuilder  # noqa: E402
from policy_engine.decide.attributes import (  # noqa: E402
    LlmRequest,
    Peer,
    RequestAttributes,
    llm_request,
    parse_body,
)
from policy_engine.decide.pipeline import Pipeline  # noqa: E402
from policy_engine.decide.tenants import Tenant  # noqa: E402
from policy_engine.policy import bundle as b  # noqa: E402
from policy_engine.policy import schema as s  # noqa: E402
from policy_engine.policy.compiler import load_bundle  # noqa: E402
from policy_engine.policy.source import parse_documents  # noqa: E402
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot  # noqa: E402

REFERENCE = "cel-expr-python"

# ---------------------------------------------------------------------------------------------
# The expressions of the bundle
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One CEL expression of the bundle, where it sits, and whether it sees `backend`."""

    id: str
    expr: b.Expr
    uses_backend: bool = False

    @property
    def source(self) -> str:
        return self.expr.source


def collect_cases(bundle: b.Bundle) -> list[Case]:
    """Every expression a decision can evaluate, in pipeline order (canary `analysis` skipped)."""
    cases: list[Case] = []
    for policy in bundle.policies():
        name = policy.name
        if policy.when is not None:
            cases.append(Case(f"{name}.when", policy.when))
        if isinstance(policy, b.AccessPolicy | b.ModerationPolicy):
            cases.extend(Case(f"{name}/{rule.name}.when", rule.when) for rule in policy.rules)
        elif isinstance(policy, b.RoutingPolicy):
            cases.extend(Case(f"{name}/{rule.name}.when", rule.when) for rule in policy.shedding)
            for route in policy.routes:
                prefix = f"{name}/{route.name}"
                cases.append(Case(f"{prefix}.when", route.when))
                cases.append(Case(f"{prefix}.require", route.require, uses_backend=True))
                if route.score is not None:
                    cases.append(Case(f"{prefix}.score", route.score, uses_backend=True))
                cases.extend(Case(f"{prefix}.headers[{header}]", expr) for header, expr in route.headers)
        elif isinstance(policy, b.QuotaPolicy):
            for limit in policy.limits:
                cases.append(Case(f"{name}/{limit.name}.when", limit.when))
                cases.append(Case(f"{name}/{limit.name}.key", limit.key))
        elif isinstance(policy, b.CanaryPolicy):
            cases.append(Case(f"{name}.eligible", policy.eligible))
            cases.append(Case(f"{name}.sticky_key", policy.sticky_key))
    return cases


def term_lists(bundle: b.Bundle) -> dict[str, library.TermMatcher]:
    """The named term lists of the bundle's moderation policies (for terms.any / terms.find)."""
    lists: dict[str, library.TermMatcher] = {}
    for file in bundle.files:
        for doc in parse_documents(file, Path(file).read_text(encoding="utf-8")):
            if isinstance(doc.data, dict) and doc.data.get("kind") == "ModerationPolicy":
                model = s.DOCUMENT_ADAPTER.validate_python(doc.data)
                assert isinstance(model, s.ModerationPolicy)
                for name, terms in model.spec.term_lists.items():
                    lists[name] = library.TermMatcher(terms)
    return lists


# ---------------------------------------------------------------------------------------------
# The input: one request, built once with the project's types, also given as plain dicts
# ---------------------------------------------------------------------------------------------

BACKENDS = ("llama-70b-a100-a", "llama-70b-a100-b", "llama-70b-h100-a", "llama-70b-h100-b", "llama-70b-v2")
SCORED_BACKEND = BACKENDS[0]
NOW = datetime(2025, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
TOPICS = (
    "Summarise the quarterly capacity report for the inference cluster and list the main risks",
    "Explain how the gateway picks the least loaded backend when two replicas serve one model",
    "Draft a short note for the on-call team about the planned maintenance window next week",
    "Compare the latency of the previous rollout with the current one and describe the trend",
    "Rewrite the onboarding guide so that new engineers can run the policy tests on a laptop",
)


@dataclass(frozen=True)
class Input:
    """Everything a decision sees, in the project's own types."""

    attrs: RequestAttributes
    body: Any
    llm: LlmRequest
    tenant: Tenant
    snapshot: TelemetrySnapshot
    now: datetime
    canary: Mapping[str, str]


def chat_messages() -> list[dict[str, str]]:
    messages = []
    for i in range(10):
        text = f"{TOPICS[i % len(TOPICS)]}. " * 3
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text[:200]})
    return messages


def build_input(pipeline: Pipeline) -> Input:
    body = {
        "model": "llama-3-70b",
        "user": "u0",
        "max_tokens": 512,
        "temperature": 0.7,
        "stream": False,
        "messages": chat_messages(),
    }
    headers = {f"x-custom-{i}": f"value-{i}-" + "v" * 20 for i in range(16)}
    headers.update(
        {
            "authorization": "Bearer sk-globex-pro-key-0002",
            "content-type": "application/json",
            "user-agent": "bench/1.0",
            "x-request-id": "0b6f5c1e-bench-0001",
        }
    )
    assert len(headers) == 20
    attrs = RequestAttributes(
        method="POST",
        path="/v1/chat/completions?api-version=2024-06-01",
        host="ai.example.com",
        scheme="https",
        protocol="HTTP/2",
        id="0b6f5c1e-bench-0001",
        headers=headers,
        body=json.dumps(body).encode(),
        time=NOW,
        source=Peer("spiffe://cluster.local/ns/gw/sa/ingress", "10.0.0.7", {"app": "gateway"}),
        destination=Peer("spiffe://cluster.local/ns/ai/sa/policy-engine", "10.0.3.4", {"app": "policy"}),
        context={"listener": "public-https", "cluster": "eu-west-1"},
    )
    snapshot = TelemetrySnapshot(
        {
            name: BackendStats(
                name,
                age_s=0.5 + i / 10,
                latency_p50_ms=180.0 + 15 * i,
                latency_p99_ms=850.0 + 40 * i,
                ttft_p99_ms=320.0 + 10 * i,
                error_rate=0.002 * i,
                inflight=3 + i,
                queue_depth=i % 3,
                kv_cache_usage=0.25 + 0.1 * i,
                rps=12.5 - i,
                tokens_per_s=1450.0 - 50 * i,
                version="v2" if name.endswith("v2") else "v1",
                region="eu-west-1" if i % 2 else "us-east-1",
                model="llama-3-70b",
                weight=100,
                capacity=64,
                labels={"gpu": "h100" if "h100" in name else "a100"},
            )
            for i, name in enumerate(BACKENDS)
        },
        version=1,
    )
    parsed = parse_body(attrs)
    tenant = pipeline.bundle.tenants.resolve(attrs.headers, attrs.source.principal)
    # The canary map as the routing stage sees it: the pipeline's own assignment for this request.
    decision = pipeline.decide(attrs, snapshot)
    return Input(attrs, parsed, llm_request(attrs, parsed), tenant, snapshot, NOW, dict(decision.canary))


def _checked(message: str, value: dict[str, Any]) -> dict[str, Any]:
    """Refuse a dict that does not carry exactly the fields of the schema's message."""
    expected = next(m for m in MESSAGES if m.name == message)
    names = [f.name for f in expected.fields]
    if sorted(value) != sorted(names):
        raise AssertionError(f"{message}: fields {sorted(value)} != schema {sorted(names)}")
    return value


def peer_dict(peer: Peer) -> dict[str, Any]:
    return _checked(
        "Peer",
        {
            "principal": peer.principal,
            "namespace": peer.namespace,
            "service_account": peer.service_account,
            "address": peer.address,
            "labels": dict(peer.labels),
        },
    )


def backend_dict(stats: BackendStats) -> dict[str, Any]:
    names = [f.name for f in next(m for m in MESSAGES if m.name == "Backend").fields]
    value = {name: getattr(stats, name) for name in names}
    value["labels"] = dict(stats.labels)
    return _checked("Backend", value)


def telemetry_dict(snapshot: TelemetrySnapshot) -> dict[str, Any]:
    """Same aggregates as MessageBuilder.telemetry."""
    backends = snapshot.backends.values()
    return _checked(
        "Telemetry",
        {
            "backends": {name: backend_dict(stats) for name, stats in snapshot.backends.items()},
            "load": snapshot.overall_load(),
            "inflight": sum(s.inflight for s in backends),
            "queue_depth": sum(s.queue_depth for s in backends),
            "healthy_backends": sum(1 for s in backends if s.healthy and not s.stale),
        },
    )


def plain_values(inp: Input, references: frozenset[str]) -> dict[str, Any]:
    """The request variables (all but telemetry) as plain Python values, field for field.

    Like the pipeline, the body and the chat messages are left empty when no expression of the
    bundle reads them (`references`).
    """
    attrs, llm, tenant = inp.attrs, inp.llm, inp.tenant
    request = {
        "id": attrs.id,
        "method": attrs.method,
        "path": attrs.path_only,
        "host": attrs.host,
        "scheme": attrs.scheme,
        "protocol": attrs.protocol,
        "headers": dict(attrs.headers),
        "query": attrs.query,
        "body": inp.body if "body" in references else None,
        "size": attrs.size if attrs.size >= 0 else len(attrs.body),
        "body_truncated": attrs.body_truncated,
        "time": attrs.time,
    }
    return {
        "request": _checked("Request", request),
        "llm": _checked(
            "Llm",
            {
                "model": llm.model,
                "kind": llm.kind,
                "stream": llm.stream,
                "max_tokens": llm.max_tokens,
                "temperature": llm.temperature,
                "user": llm.user,
                "messages": [
                    _checked("ChatMessage", {"role": m.role, "content": m.content})
                    for m in (llm.messages if "messages" in references else ())
                ],
                "prompt": llm.prompt,
                "prompt_tokens": llm.prompt_tokens,
            },
        ),
        "source": peer_dict(attrs.source),
        "destination": peer_dict(attrs.destination),
        "tenant": _checked(
            "Tenant",
            {
                "id": tenant.id,
                "tier": tenant.tier,
                "authenticated": tenant.authenticated,
                "key_id": tenant.key_id,
                "credential": tenant.credential,
                "models": list(tenant.models),
                "labels": dict(tenant.labels),
            },
        ),
        "now": inp.now,
        "context": dict(attrs.context),
        "canary": dict(inp.canary),
    }


# ---------------------------------------------------------------------------------------------
# Custom functions for the engines that take plain Python callables
# ---------------------------------------------------------------------------------------------


def _accepts(param: str, value: Any) -> bool:
    if param == "string":
        return isinstance(value, str)
    if param.startswith("list<"):
        return isinstance(value, list)
    if param == "bool":
        return isinstance(value, bool)
    if param == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if param == "double":
        return isinstance(value, float)
    return True


def dispatcher(definition: FunctionDef) -> Callable[..., Any]:
    """One callable per function name, picking the project's overload by the argument types."""
    overloads = definition.overloads

    def call(*args: Any) -> Any:
        for overload in overloads:
            if len(overload.params) == len(args) and all(map(_accepts, overload.params, args)):
                return overload.impl(*args)
        kinds = ", ".join(type(a).__name__ for a in args)
        raise TypeError(f"no overload of {definition.name}({kinds})")

    return call


CUSTOM_CALL = re.compile(r"\b([a-z]+\.[a-z_]+)\s*\(")


def custom_calls(source: str, definitions: Sequence[FunctionDef]) -> list[str]:
    names = {d.name for d in definitions}
    return [name for name in CUSTOM_CALL.findall(source) if name in names]


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


class Converted(NamedTuple):
    """What one request's evaluations run on: without and with the `backend` variable."""

    main: Any
    backend: Any


class CompileFailed(Exception):
    """Parse or check error, or a feature the engine lacks."""


class EvalFailed(Exception):
    """The engine raised or returned an error at evaluation."""


Evaluator = Callable[[Any], Any]


def describe(error: BaseException) -> str:
    """One short line for the report."""
    if isinstance(error, CELParseError) and error.line is not None and error.column is not None:
        source = str(error).splitlines()[0] if str(error) else ""
        near = source[error.column - 1 : error.column + 11]
        return f"CELParseError: syntax error at {error.line}:{error.column} near {near!r}"
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    message = message.split(" (in activation ", 1)[0]  # celpy appends its whole activation
    text = message.strip().splitlines()
    detail = text[0] if text else ""
    detail = detail if len(detail) <= 140 else detail[:137] + "..."
    return f"{type(error).__name__}: {detail}"


class Engine(ABC):
    label: str
    distribution: str

    @abstractmethod
    def prepare(self, case: Case) -> Evaluator:
        """Compile; the result evaluates the expression on one `Converted` side."""

    @abstractmethod
    def convert(self, with_backend: bool) -> Converted:
        """Turn the request into the engine's input (the per-request conversion cost)."""

    @abstractmethod
    def result(self, raw: Any) -> Any:
        """Plain Python value of a raw evaluation result; EvalFailed when it is an error."""

    @abstractmethod
    def compile_literal(self, source: str) -> Evaluator:
        """For the probes: an expression without variables."""

    def supports_dotted_functions(self) -> bool:
        return True

    def converted_and_ready(self) -> Converted:
        """`convert` plus whatever the engine defers to the first evaluation (timed as conversion)."""
        return self.convert(with_backend=True)

    @property
    def version(self) -> str:
        return metadata.version(self.distribution)


class CelExprPython(Engine):
    """The project's engine, used exactly as Pipeline uses it."""

    label = REFERENCE
    distribution = "cel-expr-python"

    def __init__(self, bundle: b.Bundle, inp: Input) -> None:
        self.bundle = bundle
        self.input = inp
        self.messages = MessageBuilder()
        self.literal_env = Environment([], ())

    def prepare(self, case: Case) -> Evaluator:
        return case.expr.program.eval  # compiled and type-checked by load_bundle

    def values(self) -> dict[str, Any]:
        """(c) The protobuf messages built from the attributes, as Pipeline does per request."""
        inp, messages = self.input, self.messages
        telemetry, _ = messages.telemetry(inp.snapshot)
        return {
            "request": messages.request(inp.attrs, inp.body, "body" in self.bundle.references),
            "llm": messages.llm(inp.llm, "messages" in self.bundle.references),
            "source": messages.peer(inp.attrs.source),
            "destination": messages.peer(inp.attrs.destination),
            "tenant": messages.tenant(inp.tenant),
            "telemetry": telemetry,
            "now": inp.now,
            "context": dict(inp.attrs.context),
            "canary": dict(inp.canary),
        }

    def scored_backend(self) -> Any:
        _, backends = self.messages.telemetry(self.input.snapshot)
        return backends[SCORED_BACKEND]

    def activations(self, values: dict[str, Any], with_backend: bool) -> Converted:
        """(a) The activations, as Pipeline creates them."""
        main = self.bundle.env.activation(values)
        if not with_backend:
            return Converted(main, None)
        return Converted(
            main, self.bundle.backend_env.activation({**values, "backend": self.scored_backend()})
        )

    def convert(self, with_backend: bool) -> Converted:
        return self.activations(self.values(), with_backend)

    def result(self, raw: Any) -> Any:
        return raw  # Program.eval already raised CelEvalError or returned plain_value()

    def compile_literal(self, source: str) -> Evaluator:
        try:
            program = self.literal_env.compile(source)
        except CelCompileError as error:
            raise CompileFailed(error.message) from None
        activation = self.literal_env.activation({})
        return lambda _: program.eval(activation)


def celpy_native(value: Any) -> Any:
    """celpy's types → plain Python (BoolType is an int subclass, not a bool)."""
    if value is None:
        return None
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.IntType | celtypes.UintType):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, celtypes.TimestampType):
        return datetime.fromtimestamp(value.timestamp(), UTC)
    if isinstance(value, celtypes.ListType):
        return [celpy_native(v) for v in value]
    if isinstance(value, celtypes.MapType):
        return {celpy_native(k): celpy_native(v) for k, v in value.items()}
    return value


class CelPython(Engine):
    label = "cel-python"
    distribution = "cel-python"

    def __init__(self, definitions: Sequence[FunctionDef], inp: Input, references: frozenset[str]) -> None:
        self.env = celpy.Environment()
        self.functions = {d.name: self._wrap(dispatcher(d)) for d in definitions}
        self.input = inp
        self.references = references
        self._snapshot: TelemetrySnapshot | None = None
        self._telemetry: Any = None
        self._backend: Any = None

    @staticmethod
    def _wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            return json_to_cel(function(*(celpy_native(a) for a in args)))

        return call

    def supports_dotted_functions(self) -> bool:
        try:
            program = self.env.program(
                self.env.compile('bench.probe("x")'),
                functions={"bench.probe": lambda _: celtypes.BoolType(True)},
            )
            return self.result(program.evaluate({})) is True
        except Exception:
            return False

    def prepare(self, case: Case) -> Evaluator:
        try:
            ast = self.env.compile(case.source)
        except Exception as error:
            raise CompileFailed(describe(error)) from None
        return self.env.program(ast, functions=self.functions).evaluate

    def convert(self, with_backend: bool) -> Converted:
        inp = self.input
        if inp.snapshot is not self._snapshot:  # once per snapshot, like MessageBuilder.telemetry
            self._telemetry = json_to_cel(telemetry_dict(inp.snapshot))
            self._backend = json_to_cel(backend_dict(inp.snapshot.backends[SCORED_BACKEND]))
            self._snapshot = inp.snapshot
        activation = {name: json_to_cel(value) for name, value in plain_values(inp, self.references).items()}
        activation["telemetry"] = self._telemetry
        if with_backend:
            activation["backend"] = self._backend
        return Converted(activation, activation)

    def result(self, raw: Any) -> Any:
        if isinstance(raw, CELEvalError):
            raise EvalFailed(describe(raw))
        return celpy_native(raw)

    def compile_literal(self, source: str) -> Evaluator:
        try:
            program = self.env.program(self.env.compile(source))
        except Exception as error:
            raise CompileFailed(describe(error)) from None
        return lambda _: program.evaluate({})


class CelRust(Engine):
    label = "cel (Rust)"
    distribution = "common-expression-language"

    def __init__(self, definitions: Sequence[FunctionDef], inp: Input, references: frozenset[str]) -> None:
        self.functions = {d.name: dispatcher(d) for d in definitions}
        self.input = inp
        self.references = references
        self._ready = rust_cel.compile("true")

    def supports_dotted_functions(self) -> bool:
        try:
            context = rust_cel.Context(functions={"bench.probe": lambda _: True})
            return rust_cel.compile('bench.probe("x")').execute(context) is True
        except Exception:
            return False

    def prepare(self, case: Case) -> Evaluator:
        try:
            program = rust_cel.compile(case.source)
        except Exception as error:
            raise CompileFailed(describe(error)) from None
        return program.execute

    def convert(self, with_backend: bool) -> Converted:
        inp = self.input
        variables = plain_values(inp, self.references)
        variables["telemetry"] = telemetry_dict(inp.snapshot)
        if with_backend:
            variables["backend"] = backend_dict(inp.snapshot.backends[SCORED_BACKEND])
        context = rust_cel.Context(variables=variables, functions=self.functions)
        return Converted(context, context)

    def converted_and_ready(self) -> Converted:
        # A Context converts its variables into the CEL-side environment at the first evaluation.
        converted = self.convert(with_backend=True)
        self._ready.execute(converted.main)
        return converted

    def result(self, raw: Any) -> Any:
        return raw

    def compile_literal(self, source: str) -> Evaluator:
        try:
            program = rust_cel.compile(source)
        except Exception as error:
            raise CompileFailed(describe(error)) from None
        return lambda _: program.execute()


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------

OK = "ok"
DIFFERS = "differs"
UNSUPPORTED = "unsupported"
COMPILE_ERROR = "compile error"
EVAL_ERROR = "eval error"


@dataclass
class Outcome:
    status: str
    value: Any = None
    detail: str = ""
    evaluator: Evaluator | None = None
    median_us: float | None = None


def same(a: Any, b: Any) -> bool:
    """Equal values of the same Python type (True is not 1, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def evaluate_once(engine: Engine, case: Case, evaluator: Evaluator, converted: Converted) -> Any:
    """The plain result; EvalFailed for any error the engine raises or returns."""
    try:
        raw = evaluator(converted.backend if case.uses_backend else converted.main)
        return engine.result(raw)
    except EvalFailed:
        raise
    except Exception as error:  # each engine raises its own types
        raise EvalFailed(describe(error)) from None


def check(
    engine: Engine,
    cases: Sequence[Case],
    definitions: Sequence[FunctionDef],
    reference: Mapping[str, Outcome] | None,
) -> dict[str, Outcome]:
    dotted = engine.supports_dotted_functions()
    converted = engine.convert(with_backend=True)
    outcomes: dict[str, Outcome] = {}
    for case in cases:
        calls = custom_calls(case.source, definitions)
        try:
            evaluator = engine.prepare(case)
            value = evaluate_once(engine, case, evaluator, converted)
        except CompileFailed as error:
            status = UNSUPPORTED if calls and not dotted else COMPILE_ERROR
            outcomes[case.id] = Outcome(status, detail=str(error))
            continue
        except EvalFailed as error:
            status = UNSUPPORTED if calls and not dotted else EVAL_ERROR
            outcomes[case.id] = Outcome(status, detail=str(error))
            continue
        expected = None if reference is None else reference[case.id]
        if expected is not None and (expected.status != OK or not same(expected.value, value)):
            shown = "error" if expected.status != OK else repr(expected.value)
            outcomes[case.id] = Outcome(DIFFERS, value, f"{value!r} vs {REFERENCE} {shown}", evaluator)
        else:
            outcomes[case.id] = Outcome(OK, value, evaluator=evaluator)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], iterations: int, warmup: int) -> list[float]:
    """Microseconds per call, one sample per call."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        fn()
        samples.append((clock() - start) / 1000)
    return samples


def request_runner(engine: Engine, plan: Sequence[tuple[Evaluator, bool]]) -> Callable[[], None]:
    """One request: convert the input once, then evaluate every planned expression once."""
    with_backend = any(uses_backend for _, uses_backend in plan)

    def run() -> None:
        main, backend = engine.convert(with_backend)
        for evaluate, uses_backend in plan:
            evaluate(backend if uses_backend else main)

    return run


@dataclass
class Job:
    """One timed loop body; jobs are run interleaved so that machine noise hits them alike."""

    engine: str
    subset: str  # which expressions ("own", "common", "as <engine>", a case id, a step name)
    case_ids: list[str]
    run: Callable[[], object]
    samples: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples)


def run_interleaved(jobs: Sequence[Job], iterations: int, rounds: int, warmup: int) -> None:
    per_round = max(1, iterations // rounds)
    for job in jobs:
        measure(job.run, 0, warmup)
    for _ in range(rounds):
        for job in jobs:
            job.samples.extend(measure(job.run, per_round, 0))


# ---------------------------------------------------------------------------------------------
# Probes: literal expressions where engines are known to part ways
# ---------------------------------------------------------------------------------------------

PROBES = (
    ("1 == 1.0", "heterogeneous numeric equality"),
    ("1 < 1.5", "heterogeneous numeric ordering"),
    ("dyn(1) == 1.0", "equality through dyn"),
    ('size("héllo")', "size of a string: code points"),
    ("9223372036854775807 + 1", "int64 overflow is an error"),
    ("1 / 0", "division by zero is an error"),
    ("-7 / 2", "truncating division"),
    ("string(1e20)", "double to string"),
    ('{"a": 1}[?"b"].orValue(0)', "optional syntax (policies use it)"),
    ('"a,b".split(",")', "strings extension (opt-in cel.stdlib not added)"),
)


def probe(engines: Sequence[Engine]) -> list[dict[str, str]]:
    rows = []
    for source, note in PROBES:
        row = {"expression": source, "note": note}
        for engine in engines:
            try:
                value = engine.result(engine.compile_literal(source)(None))
                row[engine.label] = repr(value)
            except CompileFailed:
                row[engine.label] = "compile error"
            except Exception as error:  # the engines raise assorted types at evaluation
                row[engine.label] = f"error ({type(error).__name__})"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> str:
    return (
        f"{platform.machine()}, platform.processor()={platform.processor()!r} "
        f"({cpu_model() or 'model unknown'}), os.cpu_count()={os.cpu_count()}, "
        f"{platform.system()} {platform.release()}"
    )


def short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=800, help="timed runs per measurement (default 800)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds the timed loops are interleaved in")
    parser.add_argument("--policies", default=str(ROOT / "policies"), help="policy directory")
    parser.add_argument("--json", dest="json_file", help="write the raw numbers to this file")
    args = parser.parse_args()
    iterations = max(1, args.iterations)
    warmup = max(5, iterations // 10)

    load_before = os.getloadavg()
    bundle = load_bundle(args.policies)
    pipeline = Pipeline(bundle)
    inp = build_input(pipeline)
    decision = pipeline.decide(inp.attrs, inp.snapshot)
    cases = collect_cases(bundle)
    definitions = library_functions(term_lists(bundle))

    reference_engine = CelExprPython(bundle, inp)
    engines: list[Engine] = [
        reference_engine,
        CelPython(definitions, inp, bundle.references),
        CelRust(definitions, inp, bundle.references),
    ]

    # --- correctness --------------------------------------------------------------------------
    outcomes: dict[str, dict[str, Outcome]] = {}
    outcomes[REFERENCE] = check(reference_engine, cases, definitions, None)
    for engine in engines[1:]:
        outcomes[engine.label] = check(engine, cases, definitions, outcomes[REFERENCE])

    # --- per expression, interleaved ---------------------------------------------------------
    expression_jobs: list[tuple[Outcome, Job]] = []
    converted = {engine.label: engine.convert(with_backend=True) for engine in engines}
    for case in cases:  # case by case, so that the engines of one expression run close in time
        for engine in engines:
            outcome = outcomes[engine.label][case.id]
            if outcome.evaluator is None:
                continue
            side = converted[engine.label]
            arg = side.backend if case.uses_backend else side.main
            run = (lambda e, a: lambda: e(a))(outcome.evaluator, arg)
            expression_jobs.append((outcome, Job(engine.label, case.id, [case.id], run)))
    run_interleaved([j for _, j in expression_jobs], iterations, args.rounds, warmup)
    for outcome, expression_job in expression_jobs:
        outcome.median_us = expression_job.median_us

    # --- per request, interleaved -------------------------------------------------------------
    def plan(engine: Engine, ids: Sequence[str]) -> list[tuple[Evaluator, bool]]:
        chosen = []
        for case in cases:
            evaluator = outcomes[engine.label][case.id].evaluator
            if case.id in ids and evaluator is not None:
                chosen.append((evaluator, case.uses_backend))
        return chosen

    evaluated = {
        e.label: [c.id for c in cases if outcomes[e.label][c.id].evaluator is not None] for e in engines
    }
    common = [c.id for c in cases if all(outcomes[e.label][c.id].status == OK for e in engines)]
    jobs: list[Job] = []
    for engine in engines:
        ids = evaluated[engine.label]
        jobs.append(Job(engine.label, "own", ids, request_runner(engine, plan(engine, ids))))
        if engine is not reference_engine:
            jobs.append(
                Job(
                    REFERENCE,
                    f"as {engine.label}",
                    ids,
                    request_runner(reference_engine, plan(reference_engine, ids)),
                )
            )
        jobs.append(Job(engine.label, "common", common, request_runner(engine, plan(engine, common))))
    conversions = {e.label: Job(e.label, "conversion", [], e.converted_and_ready) for e in engines}

    # cel-expr-python step by step: (c) messages, (a) activations, (b) evaluations on reused activations
    values = reference_engine.values()
    backend_values = {**values, "backend": reference_engine.scored_backend()}
    main_act, backend_act = reference_engine.activations(values, with_backend=True)
    reference_plan = plan(reference_engine, evaluated[REFERENCE])

    def eval_all() -> None:
        for evaluate, uses_backend in reference_plan:
            evaluate(backend_act if uses_backend else main_act)

    steps = [
        Job(
            REFERENCE,
            "(c) build the messages from the attributes (MessageBuilder)",
            [],
            reference_engine.values,
        ),
        Job(REFERENCE, "(a) bundle.env.activation(values)", [], lambda: bundle.env.activation(values)),
        Job(
            REFERENCE,
            "(a) bundle.backend_env.activation(values + backend)",
            [],
            lambda: bundle.backend_env.activation(backend_values),
        ),
        Job(
            REFERENCE, f"(b) evaluate all {len(reference_plan)} expressions, activations reused", [], eval_all
        ),
    ]
    run_interleaved([*jobs, *conversions.values(), *steps], iterations, args.rounds, warmup)

    def job(engine: str, subset: str) -> Job:
        return next(j for j in jobs if j.engine == engine and j.subset == subset)

    noop = measure(lambda: None, iterations, warmup)
    probes = probe(engines)

    # --- print ----------------------------------------------------------------------------------
    versions = {e.distribution: e.version for e in engines}
    versions["protobuf"] = metadata.version("protobuf")
    print("# CEL engines on the example policies\n")
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(f"python: {platform.python_implementation()} {platform.python_version()}")
    print(f"machine: {machine()}")
    load_after = os.getloadavg()
    print(
        f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
        "(other processes compete with the timings when it exceeds the CPU count)"
    )
    print("packages: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    print(
        f"bundle: {bundle.version} from {args.policies}: {len(bundle.policies())} policies, "
        f"{len(cases)} expressions (canary analysis skipped)"
    )
    print(
        f"input: POST {inp.attrs.path} with {len(inp.attrs.headers)} headers, model {inp.llm.model}, "
        f"user {inp.llm.user}, {len(inp.llm.messages)} messages ({len(inp.llm.prompt)} prompt characters, "
        f"{inp.llm.prompt_tokens} tokens est.), tenant {inp.tenant.id} ({inp.tenant.tier}), "
        f"{len(inp.snapshot.backends)} backends, canary {dict(inp.canary)}"
    )
    outcome_text = (
        f"allow → {decision.route}" if decision.allowed else f"deny {decision.status} {decision.reason}"
    )
    print(f"pipeline decision for this input: {outcome_text}")
    print(
        f"iterations: {iterations} per measurement after {warmup} warm-up calls; all timed loops "
        f"interleaved in {args.rounds} rounds; no-op loop {statistics.median(noop):.2f} µs\n"
    )

    print("## Summary\n")
    print(
        "| engine | version | compiled OK | unsupported | errored | results differ | input conversion µs "
        "| per request µs (exprs) | cel-expr-python, same exprs µs | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, dict[str, Any]] = {}
    for engine in engines:
        statuses = [o.status for o in outcomes[engine.label].values()]
        own = job(engine.label, "own")
        versus = own if engine is reference_engine else job(REFERENCE, f"as {engine.label}")
        row: dict[str, Any] = {
            "version": engine.version,
            "compiled_ok": len(cases) - statuses.count(UNSUPPORTED) - statuses.count(COMPILE_ERROR),
            "unsupported": statuses.count(UNSUPPORTED),
            "compile_errors": statuses.count(COMPILE_ERROR),
            "eval_errors": statuses.count(EVAL_ERROR),
            "differ": statuses.count(DIFFERS),
            "conversion_us": conversions[engine.label].median_us,
            "per_request_us": own.median_us,
            "per_request_exprs": len(own.case_ids),
            "reference_same_exprs_us": versus.median_us,
            "ratio": own.median_us / versus.median_us,
        }
        summary[engine.label] = row
        errored = row["compile_errors"] + row["eval_errors"]
        print(
            f"| {engine.label} | {row['version']} | {row['compiled_ok']}/{len(cases)} | {row['unsupported']} "
            f"| {errored} ({row['compile_errors']} compile, {row['eval_errors']} eval) | {row['differ']} "
            f"| {row['conversion_us']:.1f} | {row['per_request_us']:.1f} ({row['per_request_exprs']}) "
            f"| {row['reference_same_exprs_us']:.1f} | {row['ratio']:.2f}x |"
        )
    print(
        "\n- per request = convert the input once + evaluate once each expression the engine can run "
        "(compiled, no error); ratio = that time / cel-expr-python's time on the same expressions, both "
        "measured in this run.\n"
        "- input conversion: cel-expr-python builds the messages and both activations; cel-python runs "
        "json_to_cel (telemetry cached per snapshot); cel builds a Context and evaluates `true` once, "
        "because a Context converts its variables at the first evaluation.\n"
    )
    reference_common = job(REFERENCE, "common").median_us
    print(f"## Expressions every engine evaluates to the same result ({len(common)} of {len(cases)})\n")
    print("| engine | per request µs | ratio to cel-expr-python |")
    print("|---|---:|---:|")
    for engine in engines:
        median = job(engine.label, "common").median_us
        print(f"| {engine.label} | {median:.1f} | {median / reference_common:.2f}x |")

    print("\n## cel-expr-python per request, step by step\n")
    print("| step | median µs |")
    print("|---|---:|")
    for step in steps:
        print(f"| {step.subset} | {step.median_us:.1f} |")
    total = job(REFERENCE, "own").median_us
    print(f"| per request: (c) + (a) + (b) on fresh activations (the summary's total) | {total:.1f} |")

    print("\n## Per expression: median µs of one evaluation (input already converted)\n")
    header = " | ".join(e.label for e in engines)
    print(f"| # | expression | source | {REFERENCE} result | {header} |")
    print("|---:|---|---|---|" + "---:|" * len(engines))
    for number, case in enumerate(cases, start=1):
        cells = []
        for engine in engines:
            outcome = outcomes[engine.label][case.id]
            if outcome.median_us is None:
                cells.append(outcome.status)
            else:
                mark = " ≠" if outcome.status == DIFFERS else ""
                cells.append(f"{outcome.median_us:.2f}{mark}")
        reference = outcomes[REFERENCE][case.id]
        shown = repr(reference.value) if reference.status == OK else reference.status
        print(
            f"| {number} | {case.id} | `{cell(short(case.source, 60))}` | {cell(short(shown, 24))} | "
            + " | ".join(cells)
            + " |"
        )
    print("\n(≠: evaluated, but the result differs from cel-expr-python's)\n")

    print("## Failures and differences\n")
    any_issue = False
    for engine in engines:
        for case in cases:
            outcome = outcomes[engine.label][case.id]
            if outcome.status != OK:
                any_issue = True
                print(f"- {engine.label}, {case.id}: **{outcome.status}**: {outcome.detail}")
    if not any_issue:
        print("none")

    print("\n## Probes: literal expressions\n")
    print("| expression | what | " + " | ".join(e.label for e in engines) + " |")
    print("|---|---|" + "---|" * len(engines))
    for row in probes:
        print(
            f"| `{cell(row['expression'])}` | {row['note']} | "
            + " | ".join(cell(row[e.label]) for e in engines)
            + " |"
        )

    if args.json_file:
        raw = {
            "command": sys.argv,
            "python": platform.python_version(),
            "machine": machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_before_after": [load_before[0], load_after[0]],
            "packages": versions,
            "iterations": iterations,
            "rounds": args.rounds,
            "bundle": bundle.version,
            "noop_us": statistics.median(noop),
            "summary": summary,
            "common_case_ids": common,
            "per_request": [
                {
                    "engine": j.engine,
                    "subset": j.subset,
                    "cases": j.case_ids,
                    "median_us": j.median_us,
                    "samples_us": j.samples,
                }
                for j in jobs
            ],
            "conversion": {
                label: {"median_us": j.median_us, "samples_us": j.samples} for label, j in conversions.items()
            },
            "reference_steps": {
                step.subset: {"median_us": step.median_us, "samples_us": step.samples} for step in steps
            },
            "expressions": [
                {
                    "id": case.id,
                    "source": case.source,
                    "uses_backend": case.uses_backend,
                    "engines": {
                        e.label: {
                            "status": outcomes[e.label][case.id].status,
                            "median_us": outcomes[e.label][case.id].median_us,
                            "result": repr(outcomes[e.label][case.id].value),
                            "detail": outcomes[e.label][case.id].detail,
                        }
                        for e in engines
                    },
                }
                for case in cases
            ],
            "probes": probes,
        }
        Path(args.json_file).write_text(json.dumps(raw, indent=2, default=str) + "\n")
        print(f"\nraw numbers written to {args.json_file}")


if __name__ == "__main__":
    main()
