"""Translated CEL (cel/native.py) held to the engine's answers (cel-cpp, `native=False`).

Every corpus expression is compiled twice, in a translating environment and in one where the
engine runs everything, and both are evaluated on the same activations: fixed ones and
hypothesis-generated ones built the way the pipeline builds them (MessageBuilder over request
attributes, tenants and telemetry snapshots). Both must fail (CelEvalError) or both must return
equal values, with types kept apart (1 is not 1.0) and NaN equal to NaN. A mismatch is a bug
in the translation: the engine is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from policy_engine.cel import engine as cel_engine
from policy_engine.cel.engine import CelCompileError, CelEvalError, Environment, Program
from policy_engine.cel.functions import library_functions
from policy_engine.cel.library import TermMatcher
from policy_engine.cel.schema import BACKEND_VARIABLE, VARIABLES, Variable
from policy_engine.decide.activation import MessageBuilder, RequestView
from policy_engine.decide.attributes import ChatMessage, LlmRequest, Peer, RequestAttributes, parse_body
from policy_engine.decide.attributes import llm_request as read_llm
from policy_engine.decide.tenants import Tenant
from policy_engine.policy import compiler
from policy_engine.policy.bundle import Bundle, Expr
from policy_engine.policy.compiler import ANALYSIS_VARIABLES, load_bundle
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

FUNCTIONS = library_functions({"blocked": TermMatcher(["forbidden", "top secret"])})
VARS = (
    *VARIABLES,
    BACKEND_VARIABLE,
    Variable("x", "dyn", "Any JSON-like value."),
    Variable("y", "dyn", "Any JSON-like value."),
    Variable("xs", "list<dyn>", "A list of JSON-like values."),
    Variable("mm", "map<string,dyn>", "A map of JSON-like values."),
    Variable("i", "int", "An int."),
    Variable("j", "int", "An int."),
    Variable("d", "double", "A double."),
    Variable("f", "double", "A double."),
    Variable("s", "string", "A string."),
    Variable("t", "string", "A string."),
    Variable("b", "bool", "A bool."),
    Variable("ls", "list<string>", "A list of strings."),
)
NATIVE = Environment(FUNCTIONS, VARS)
ENGINE = Environment(FUNCTIONS, VARS, native=False)

# --- the corpus ---------------------------------------------------------------------------

LOGIC = [
    '{}["a"] || true',
    'true || {}["a"]',
    '{}["a"] || false',
    'false || {}["a"]',
    '{}["a"] && false',
    'false && {}["a"]',
    '{}["a"] && true',
    "false && 1/0 == 1",
    "1/0 == 1 && false",
    "1/0 == 1 || 1/0 == 1",
    "1/0 == 1 || true",
    "b || 1 / i == 1",
    "b && x == 1",
    "x || true",
    "x && false",
    "x || b",
    "x && y",
    "!b",
    "!x",
    "!(1/0 == 1)",
    "x ? 1 : 2",
    "b ? x : y",
    "i > 0 ? 10 / i : -1",
    "(1/0 == 1) ? 1 : 2",
    "true ? 1 : 1/0",
    "false ? 1/0 : 2",
    "[1/0 == 1, true].exists(v, v)",
    "(x || true) && (false || y)",
]

COMPARE = [
    "i < j",
    "i <= j",
    "dyn(d) > dyn(i)",
    "dyn(i) >= dyn(d)",
    "d > f",
    "d == f",
    "d != f",
    "d == d",
    "d < 1.0",
    "s < t",
    "s >= t",
    "b < true",
    "false < b",
    'b"a" < b"b"',
    "null == null",
    "x < y",
    "x <= 1",
    "x > 1.5",
    "x >= y",
    "x == y",
    "x != y",
    'x == "a"',
    "x == null",
    "i == 9223372036854775807",
    "dyn(1) == 1.0",
    "dyn(1.0) == 1",
    "dyn(true) == 1",
    'dyn("1") == 1',
    "dyn(null) == 0",
    "dyn([]) == {}",
    "dyn(1) < 1.5",
    'dyn(1) < "a"',
    "dyn(-0.0) == 0",
    "dyn(1.0/0.0) > 9223372036854775807",
    "dyn(9223372036854775807) == 9223372036854775807.0",
    "dyn(9223372036854775807) < 9223372036854775807.0",
    "dyn(9007199254740993) == 9007199254740992.0",
    "dyn(9007199254740993) > 9007199254740992.0",
    "dyn(i) == d",
    "dyn(i) < d",
    "dyn(d) >= i",
    'xs == [1, "a"]',
    "mm == {}",
    'x == {"a": 1}',
    "dyn([1, 2]) == [1.0, 2.0]",
    "[1, 2] == [1, 2, 3]",
    'dyn({"a": 1}) == {"a": 1.0}',
    'dyn({1: "a"}) == {dyn(1.0): "a"}',
    '{"a": 1} == {"b": 1}',
    "[x] == [y]",
    '{"k": x} == {"k": y}',
    "[null] == [null]",
    "[[1], [2]] == [[1], [2.0]]",
    "xs != ls",
    'dyn({1: "a"}) == dyn({true: "a"})',
    "backend == backend",
    "telemetry == telemetry",
    'request.headers == {"x": "abc"}',
    'llm.messages[0] == policy_engine.v1.ChatMessage{role: "system", content: "be nice"}',
    "dyn(tenant) == {}",
    "llm.temperature == 0.0",
]

ARITHMETIC = [
    "9223372036854775807 + 1",
    "-9223372036854775807 - 2",
    "-9223372036854775807 - 1",
    "i + j",
    "i - j",
    "i * j",
    "i / j",
    "i % j",
    "-7 / 2",
    "-7 % 2",
    "7 % -2",
    "-7 % -2",
    "7 / -2",
    "(-9223372036854775807 - 1) / -1",
    "(-9223372036854775807 - 1) % -1",
    "1 / 0",
    "1 % 0",
    "1.0 / 0.0",
    "-1.0 / 0.0",
    "0.0 / 0.0",
    "1.0 / -0.0",
    "d / -0.0",
    "d / 0.0",
    "d / f",
    "d * f",
    "d + f",
    "d - f",
    "-i",
    "-d",
    "-(-9223372036854775807 - 1)",
    "-x",
    "x + y",
    "x - 1",
    "x * 2",
    "x / 2",
    "x % 2",
    "x / 2.0",
    "x * 2.0",
    "x + 1.5",
    "x - 0.5",
    '"a" + s',
    'x + "a"',
    "x + [1]",
    "xs + [1]",
    "s + t",
    'ls + ["a"]',
    "i * 1000000000000",
    "dyn(1.5) / 0.0",
    "dyn(7) / dyn(2)",
    "dyn(7) % dyn(-2)",
    "dyn(1) + dyn(1.0)",
    "dyn(true) + dyn(1)",
    "[1] + [2.0, 'a']",
    "-9223372036854775808",
    "-9223372036854775808 - 1",
    "0x10 + 1",
    "1e3 / 4.0",
    'b"ab" + b"c"',
    'size(b"\\xff\\x00")',
    "dyn(1u) == 1",
    "!!b",
    "(1 == 1) == true",
    '"\\u00e9" == "é"',
    "-(-i)",
]

STRINGS = [
    "s.startsWith(t)",
    's.endsWith("a")',
    "s.contains(t)",
    "s.size()",
    "size(s)",
    "s.lowerAscii()",
    "s.upperAscii()",
    '"ÄbC".lowerAscii()',
    '"äbc".upperAscii()',
    's + "x" == t',
    '"héllo".size()',
    'b"h\\xc3\\xa9llo".size()',
    '"😀".size()',
    'x.startsWith("a")',
    'x.endsWith("")',
    "x.contains(y)",
    "x.size()",
    "size(x)",
    "x.lowerAscii()",
    'request.path.startsWith("/v1")',
    'request.headers[?"x"].orValue("").contains("a")',
    '"abc".contains("")',
    "(s + t).startsWith(t + s)",
    '(i > 0 ? s : t).endsWith(s + "")',
    '(s + "é").contains("é" + t)',
    '"😀x".startsWith("😀")',
    's.matches("^a")',
    's.split(",")',
    's.indexOf("a")',
    "s.trim()",
]

MEMBERSHIP = [
    '"a" in ls',
    "s in ls",
    "x in xs",
    "1 in [1.0, 2]",
    "dyn(1.0) in [1]",
    '"k" in mm',
    "s in mm",
    '2 in {1: "a", 2: "b"}',
    'dyn(2.0) in {1: "a", 2: "b"}',
    'dyn(2.5) in {1: "a", 2: "b"}',
    "true in {true: 1}",
    "dyn(1) in {true: 1}",
    '"x" in request.headers',
    "llm.model in tenant.models",
    "x in y",
    "null in [null]",
    "[1] in [[1]]",
    "x in mm",
    '"a" in x',
]

INDEXING = [
    "xs[0]",
    "xs[i]",
    "xs[-1]",
    "[1, 2][2]",
    "[1, 2][-1]",
    "[1, 2][dyn(1.0)]",
    "[1, 2][dyn(1.5)]",
    "[1, 2][dyn(true)]",
    '[1, 2][dyn("1")]',
    "ls[i]",
    'mm["k"]',
    "mm[s]",
    '{"a": 1}["b"]',
    "x[0]",
    'x["a"]',
    "x[y]",
    '{0: "a"}[dyn(-0.0)]',
    '{1: "a"}[dyn(1.0)]',
    '{1: "a"}[dyn(1.5)]',
    '{1: "a"}[dyn(true)]',
    '{true: "a"}[dyn(1)]',
    'request.headers["x"]',
    'request.headers["absent-header"]',
    'request.headers[s + "x"]',
    '"absent" in tenant.labels || "zone" in telemetry.backends["a"].labels',
    'tenant.labels[?"absent"].orValue("d") + context[?s].orValue("c")',
    'telemetry.backends[?"a"].hasValue() && !telemetry.backends[?"nope"].hasValue()',
    "(s in request.headers) == request.headers[?s].hasValue()",
    'request.headers["absent-a"].contains(request.headers["absent-b"])',
    'optional.of("a").orValue(request.headers["absent"])',
    'optional.none().orValue(request.headers["absent"])',
    'request.headers[?"x"].orValue(string(1 / i))',
    'request.headers["absent"] == "1" || pii.any(llm.prompt)',
    'pii.any(llm.prompt) && request.headers["absent"] == "1"',
    'request.query["a"]',
    "llm.messages[0].content",
    "llm.messages[i].role",
    'telemetry.backends["a"].queue_depth',
    'telemetry.backends["a"].labels["zone"]',
    "tenant.models[0]",
    'request.body["model"]',
    "request.body.messages[0].content",
    "request.body.max_tokens",
    "request.body.max_tokens > 100",
    "request.body.max_tokens / 2",
    "request.body.max_tokens + 1",
    "request.body.max_tokens * 2",
    "request.body.max_tokens % 2",
    "request.body.max_tokens - 1",
    "request.body.max_tokens == 5",
    "request.body.stream == true",
    "request.body.temperature * 2.0",
    'request.body.user.startsWith("u")',
    "request.body.n[0]",
    "request.body[0]",
    "x.a",
    "x.a.b",
    "mm.k",
    "request.body.model",
    "request.body.a.b",
    'context["k"]',
    'canary[?"x"].orValue("")',
    "source.address",
    "destination.labels",
]

HAS = [
    "has(request.body)",
    "has(tenant.labels)",
    "has(llm.model)",
    "has(mm.k)",
    "has(x.a)",
    "has(x.a.b)",
    "has(request.body.model)",
    "has(request.body.messages)",
    "has(llm.messages)",
    "has(tenant.models)",
    "has(telemetry.backends)",
    "has(request.time)",
    "has(backend.labels)",
    "has(llm.max_tokens)",
    "has(llm.temperature)",
    "has(llm.stream)",
    "has(request.headers.x)",
    "has(tenant.authenticated)",
    "has(backend.error_rate)",
    "has(x.count)",
    "has(x.real)",
    "has(dyn(s).upper)",
    "has(dyn(tenant).nope)",
    "has(dyn(llm).messages)",
    "has(dyn(request).body)",
]

MACROS = [
    "[0, 1].exists(v, 1 / v == 1)",
    "[0, 1].all(v, 1 / v > 0)",
    "[1, 0].all(v, 1 / v > 0)",
    "[0, 1].all(v, 1 / v < 0)",
    "[0, 1].exists(v, 1 / v == 2)",
    "[0, 1].exists_one(v, 1 / v == 1)",
    "[1, 2, 3].map(v, v * 2)",
    "[1, 2, 3].filter(v, v % 2 == 1)",
    "[0, 1].map(v, 1 / v)",
    "[0, 1].filter(v, 1 / v == 1)",
    "xs.exists(v, v == 1)",
    "xs.all(v, v != null)",
    "xs.map(v, v)",
    "xs.filter(v, v > 0)",
    "xs.exists_one(v, v == x)",
    'mm.all(k, k != "")',
    "mm.exists(k, mm[k] == 1)",
    "mm.map(k, k)",
    "x.exists(v, v == 1)",
    "x.all(v, v != null)",
    "x.map(v, [v])",
    "ls.exists_one(v, v == s)",
    "[1, 2].map(v, v > 1, v * 10)",
    'llm.messages.exists(m, m.role == "system")',
    "llm.messages.all(m, m.content.size() < 100)",
    "llm.messages.map(m, m.content.size())",
    'llm.messages.filter(m, m.role == "user").size()',
    "telemetry.backends.all(n, telemetry.backends[n].healthy)",
    "telemetry.backends.exists(n, telemetry.backends[n].queue_depth > 5)",
    'request.headers.exists(k, k.startsWith("x-"))',
    "tenant.labels.map(k, tenant.labels[k])",
    "[[1, 2], [3]].all(l, l.all(v, v > 0))",
    "[1, 2].map(a, [3, 4].map(c, a * c))",
    "[1, 2, 3].exists(v, [2, 3].exists(w, v == w))",
    "xs.all(v, xs.exists(w, w == v))",
    "[1, 2].exists(v, v == 2) || 1/0 == 1",
    "[1, 2].all(v, v == 2) && 1/0 == 1",
    "xs.map(v, xs.filter(w, w == v).size())",
    "math.greatest(i, j)",
    "cel.bind(a, i + 1, a * a)",
    "cel.bind(a, 1/0, 5)",
    "cel.bind(a, 1/0, a)",
    "cel.bind(a, x, cel.bind(c, a, [a, c]))",
    "cel.bind(a, [1, 2], a.map(v, v + 1))",
    "cel.bind(a, 1/0, b || a == 1)",
    'cel.bind(a, {}["k"], false && a == 1)',
    'cel.bind(a, {}["k"], a == 1 || true)',
    'cel.bind(a, {"k": 2}[s], a + 1 == 3 && b)',
    'mm.filter(k, k != "")',
    "telemetry.backends.filter(n, telemetry.backends[n].healthy)",
    "request.body.messages.exists(m, has(m.content))",
    "xs.all(v, v)",
    "xs.exists(v, v)",
    "xs.exists_one(v, v)",
    "xs.filter(v, v)",
    "[1, 2].all(v, [3].all(v, v > 2))",
]

OPTIONALS = [
    'mm[?"k"].orValue("d")',
    'mm[?"zz"].orValue("d")',
    "optional.of(1).hasValue()",
    "optional.none().orValue(2)",
    "optional.none().value()",
    "optional.of(1).value()",
    "x.?a.orValue(0)",
    "x.?a.hasValue()",
    "mm.?k.hasValue()",
    'request.headers[?"x"].orValue("none")',
    'tenant.labels[?"region"].orValue("")',
    "xs[?0].orValue(-1)",
    "xs[?5].hasValue()",
    "xs[?i].orValue(-1)",
    "optional.ofNonZeroValue(s).hasValue()",
    "optional.ofNonZeroValue(0).hasValue()",
    "optional.ofNonZeroValue([]).hasValue()",
    "optional.ofNonZeroValue(x).hasValue()",
    'mm[?"a"].or(mm[?"k"]).orValue(1)',
    "x.?a.?b.orValue(1)",
    "request.?body.hasValue()",
    "tenant.?labels.hasValue()",
    'llm.?model.orValue("none")',
    "[1, ?optional.none(), ?optional.of(2)]",
    '{?"a": optional.of(1)}',
    "optional.of(x).value() == x",
    "x[?0].orValue(1)",
    'x[?"a"].orValue(1)',
    "optional.none() == optional.none()",
    "optional.of(dyn(1)) == optional.of(1.0)",
    "xs[?dyn(0.0)].orValue(-1)",
    "xs[?-1].hasValue()",
    "optional.of([1, 2])[1].orValue(0)",
    'optional.of({"a": 1}).a.orValue(0)',
    "optional.ofNonZeroValue(tenant).hasValue()",
    "optional.ofNonZeroValue(-0.0).hasValue()",
    "optional.ofNonZeroValue(d).hasValue()",
    "optional.ofNonZeroValue(tenant.labels).hasValue()",
    "optional.ofNonZeroValue(request.body).hasValue()",
]

LITERALS = [
    '{"a": 1, "a": 2}',
    '{"a": 1, "b": 2}.size()',
    "{x: 1}",
    "{s: 1, t: 2}",
    "{i: 1, j: 2}",
    '[1, "a", null, [2]]',
    "size({true: 1, 1: 2})",
    "{true: 1, 1: 2}[1]",
    "{true: 1, 1: 2}[true]",
    "{1: 1, 1.0: 2}",
    "[]",
    "{}",
    '{"a": [1, {"b": null}]}',
]

CONVERSIONS = [
    'int("12")',
    'int("-12")',
    'int("1e3")',
    'int("+5")',
    'int(" 5")',
    'int("9223372036854775808")',
    'int("-9223372036854775808")',
    'int("٣")',
    'int("0x10")',
    'int("")',
    'int("-")',
    'int("1_000")',
    "int(1.9)",
    "int(-1.9)",
    "int(1e19)",
    "int(-9223372036854775808.0)",
    "int(9223372036854775807.0)",
    "int(0.0/0.0)",
    "int(d)",
    "int(s)",
    "int(x)",
    'int(dyn("12"))',
    "int(dyn(1.5))",
    "double(i)",
    'double("1.5")',
    "double(x)",
    'double(dyn("1.5"))',
    "double(dyn(2))",
    "string(i)",
    "string(b)",
    "string(d)",
    "string(x)",
    'string(b"abc")',
    'string(b"\\xff")',
    "string(-9223372036854775807 - 1)",
    "double(dyn(true))",
    'int(" 5 ")',
]

LIBRARY = [
    'pii.any("my email is a@b.co")',
    "pii.any(llm.prompt)",
    "llm.messages.exists(m, pii.any(m.content))",
    "llm.messages.map(m, pii.kinds(m.content))",
    "pii.kinds(llm.prompt)",
    "pii.email(s) || pii.phone(s)",
    'terms.any(llm.prompt, "blocked")',
    'terms.any(s, ["foo", "bar"])',
    'terms.find(s, ["foo"])',
    'terms.any(s, "missing")',
    'net.in_cidr(source.address, "10.0.0.0/8")',
    'net.in_cidr(s, ["10.0.0.0/8"])',
    'net.in_cidr("not-ip", "10.0.0.0/8")',
    'net.in_cidr("10.1.2.3", s)',
    "globs.match(tenant.models, llm.model)",
    'globs.match("llama-*", s)',
    "tokens.estimate(s)",
    "tokens.estimate(s) * 9223372036854775807",
    'semver.compare(s, "1.2.3")',
    'semver.satisfies("1.2.3", ">=1.0.0")',
    "injection.score(llm.prompt) > 0.5",
    "injection.detected(s)",
    "ls.exists(v, pii.email(v))",
    "ls.map(v, tokens.estimate(v))",
    "tenant.models.exists(p, globs.match(p, llm.model))",
    "pii.any(x)",
    "tokens.estimate(x)",
    "xs.exists(v, pii.any(v))",
    'net.in_cidr(x, "10.0.0.0/8")',
    'globs.match("*", x)',
    'terms.find(x, ["foo"])',
    "pii.any(request.body.model)",
    'pii.any(request.headers[?"x"].orValue(s)) && tokens.estimate(llm.prompt) > 3',
]

MESSAGES = [
    'policy_engine.v1.Backend{name: "a", stale: true}.stale',
    'policy_engine.v1.Backend{name: "a"}',
    "policy_engine.v1.Backend{name: s, weight: i}.weight",
    'policy_engine.v1.Backend{labels: {"a": "b"}}.labels',
    'policy_engine.v1.ChatMessage{role: "user"} == policy_engine.v1.ChatMessage{role: "user"}',
    'telemetry.backends["a"] == policy_engine.v1.Backend{name: "a"}',
    "backend.queue_depth * 10",
    "double(backend.queue_depth) * 10.0 + backend.kv_cache_usage * 100.0 + backend.latency_p99_ms / 100.0",
    'backend.labels["zone"]',
    "backend.healthy && !backend.stale && backend.error_rate < 0.2",
    "tenant == tenant",
    "llm.messages == llm.messages",
    "request.time",
    "now",
    'now - duration("1h") < request.time',
    "request.size + 1",
    "request.size * 1000000000000",
    "llm.max_tokens * i",
    'request.body == {"model": "m"}',
    "request.body.messages.size()",
    'request.body.messages.exists(m, m.role == "user")',
    "size(llm.messages)",
    "telemetry.load > 0.5",
    "telemetry.backends.size()",
    '"a" in telemetry.backends ? telemetry.backends["a"].healthy : false',
    'cel.bind(backend, "a" in telemetry.backends ? telemetry.backends["a"] : '
    'policy_engine.v1.Backend{name: "a", stale: true}, backend.stale)',
    "tenant",
    "llm.messages",
    "tenant.models",
    "request.headers",
    "telemetry.backends",
    "tenant.labels",
    'tenant.tier == "free" && llm.max_tokens > 2048',
    'tenant.authenticated && llm.model != "" && !globs.match(tenant.models, llm.model)',
    'tenant.id + "/" + llm.user',
    "llm.temperature > 1.0 || llm.stream",
    "llm.prompt_tokens + llm.max_tokens",
    "request.body_truncated == b",
    "dyn(llm.messages) == dyn(llm.messages)",
    'dyn(tenant).tier == "free"',
    "dyn(tenant.models) == []",
    "tenant.models + ls",
    "llm.messages + llm.messages",
    "tenant.models + tenant.models",
    "tenant.labels == tenant.labels",
    "size(tenant.labels)",
    "tenant.labels.size()",
    '"region" in tenant.labels',
    'tenant.models == ["llama-3-*", "gpt-4o"]',
    "llm.max_tokens + 9223372036854775807",
    'request.body.?model.orValue("")',
    'tenant.labels.?region.orValue("")',
    "has(telemetry.backends.a)",
    "size(request.body)",
    "int(request.body.max_tokens)",
    "dyn(telemetry).backends.a.name",
    'dyn(llm).messages[0].content.startsWith("be")',
    "dyn(request).time",
    "dyn(request).time == dyn(request).time",
    "has(dyn(request).time)",
    "dyn(tenant).nope",
    "context",
    'context["k"].size()',
    'tenant.labels[?"region"].orValue("") == "eu" || request.headers[?"x-region"].orValue("") == "eu"',
]

CORPUS = [
    *LOGIC,
    *COMPARE,
    *ARITHMETIC,
    *STRINGS,
    *MEMBERSHIP,
    *INDEXING,
    *HAS,
    *MACROS,
    *OPTIONALS,
    *LITERALS,
    *CONVERSIONS,
    *LIBRARY,
    *MESSAGES,
]

# Left on purpose to the engine: uint, timestamps/durations, `matches`, the string extension
# beyond lowerAscii/upperAscii, the math extension, optional list/map entries,
# string() of doubles and dyn values, non-scalar fields in message literals, ...
EXPECTED_UNTRANSLATED = frozenset(
    {
        's.matches("^a")',
        's.split(",")',
        's.indexOf("a")',
        "s.trim()",
        "math.greatest(i, j)",
        "[1, ?optional.none(), ?optional.of(2)]",
        '{?"a": optional.of(1)}',
        'b"ab" + b"c"',  # a bytes result: the engine hands bytes back as a list of ints
        "string(d)",
        "string(x)",
        'policy_engine.v1.Backend{labels: {"a": "b"}}.labels',
        "request.time",
        "now",
        'now - duration("1h") < request.time',
        "dyn(1u) == 1",  # uint
        # No static bound on its work (cel/cost.py): the engine's iteration budget applies.
        "tenant.models.exists(p, globs.match(p, llm.model))",
    }
)


# map() and filter() over a map: CEL leaves the order of a map's keys unspecified, and the
# engine's differs from one process to the next for the same map (hash seeding), so no
# implementation can reproduce it. Their results are compared as lists in any order; only
# the order is let go (elements, errors and types still count).
UNORDERED = frozenset(
    {
        "mm.map(k, k)",
        "x.map(v, [v])",
        "tenant.labels.map(k, tenant.labels[k])",
        'mm.filter(k, k != "")',
        "telemetry.backends.filter(n, telemetry.backends[n].healthy)",
    }
)


@dataclasses.dataclass(frozen=True)
class Case:
    source: str
    native: Program
    engine: Program


def _compile_corpus() -> tuple[list[Case], dict[str, str]]:
    cases, rejected = [], {}
    for source in dict.fromkeys(CORPUS):
        try:
            engine = ENGINE.compile(source)
        except CelCompileError as error:
            rejected[source] = error.message
            continue
        cases.append(Case(source, NATIVE.compile(source), engine))
    return cases, rejected


CASES, REJECTED = _compile_corpus()

# --- inputs -------------------------------------------------------------------------------

BUILDER = MessageBuilder()
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """The raw inputs of one activation (readable in a failure report)."""

    attrs: RequestAttributes = dataclasses.field(default_factory=RequestAttributes)
    llm: LlmRequest | None = None  # None: read from the body, as the pipeline does
    tenant: Tenant = dataclasses.field(default_factory=Tenant)
    snapshot: TelemetrySnapshot = dataclasses.field(default_factory=TelemetrySnapshot)
    backend: BackendStats = dataclasses.field(default_factory=lambda: BackendStats(name="a"))
    canary: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dyn: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # x y xs mm i j d f s t b ls

    def values(self) -> dict[str, Any]:
        body = parse_body(self.attrs)
        llm = self.llm if self.llm is not None else read_llm(self.attrs, body)
        telemetry, _ = MessageBuilder().telemetry(self.snapshot)
        values: dict[str, Any] = {
            "request": BUILDER.request(self.attrs, body, True),
            "llm": BUILDER.llm(llm, True),
            "source": BUILDER.peer(self.attrs.source),
            "destination": BUILDER.peer(self.attrs.destination),
            "tenant": BUILDER.tenant(self.tenant),
            "telemetry": telemetry,
            "now": self.attrs.time or NOW,
            "context": dict(self.attrs.context),
            "canary": dict(self.canary),
            "backend": BUILDER.backend(self.backend),
            "x": None,
            "y": None,
            "xs": [],
            "mm": {},
            "i": 0,
            "j": 0,
            "d": 0.0,
            "f": 0.0,
            "s": "",
            "t": "",
            "b": False,
            "ls": [],
        }
        values.update(self.dyn)
        return values

    def views(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The same inputs as the pipeline gives translated expressions: the request's own Python
        objects (decide/activation.py) where `values` has protobuf messages."""
        body = parse_body(self.attrs)
        llm = self.llm if self.llm is not None else read_llm(self.attrs, body)
        return {
            **values,
            "request": RequestView(self.attrs, body, True),
            "llm": llm,
            "source": self.attrs.source,
            "destination": self.attrs.destination,
            "tenant": self.tenant,
        }


def chat_body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


PROMPT = "Hello, mail me at jane@example.com or call +1 415 555 0100"
FIXED = [
    Scenario(),
    Scenario(
        attrs=RequestAttributes(
            method="POST",
            path="/v1/chat/completions?a=1&b=",
            headers={"x": "abc", "x-region": "eu", "authorization": "Bearer k"},
            body=chat_body(
                model="llama-3-70b",
                max_tokens=5,
                temperature=0.7,
                stream=True,
                user="u1",
                messages=[
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": PROMPT},
                    {"role": "user", "content": "this is top secret, forbidden stuff"},
                ],
                n=[1, "two", None],
            ),
            time=NOW - timedelta(seconds=3),
            source=Peer(principal="spiffe://c/ns/a/sa/b", address="10.1.2.3", labels={"app": "x"}),
            context={"k": "v"},
        ),
        tenant=Tenant(
            id="acme",
            tier="free",
            authenticated=True,
            credential="api_key",
            models=("llama-3-*", "gpt-4o"),
            labels={"region": "eu"},
        ),
        snapshot=TelemetrySnapshot(
            backends={
                "a": BackendStats(name="a", queue_depth=7, labels={"zone": "z1"}, latency_p99_ms=120.5),
                "b": BackendStats(name="b", healthy=False, stale=True, error_rate=0.5),
            },
            load=0.9,
        ),
        backend=BackendStats(name="a", queue_depth=3, kv_cache_usage=0.25, labels={"zone": "z2"}),
        canary={"x": "canary"},
        dyn={
            "x": {"a": {"b": 1}, "k": [1, 2]},
            "y": {"a": {"b": 1.0}, "k": [1, 2]},
            "xs": [1, "a", None, 2.5, True],
            "mm": {"k": 1, "a": "b"},
            "i": 3,
            "j": -2,
            "d": 2.5,
            "f": -0.0,
            "s": "abc",
            "t": "bc",
            "b": True,
            "ls": ["a", "jane@example.com", "10.0.0.1"],
        },
    ),
    Scenario(
        attrs=RequestAttributes(
            method="POST",
            path="/v1/completions",
            body=b'{"max_tokens": 2.5, "model": 7, "messages": "nope", "stream": "yes", "a": {"b": []}}',
        ),
        dyn={
            "x": 0,
            "y": 0.0,
            "xs": [0, 1],
            "i": INT_MIN,
            "j": -1,
            "d": math.nan,
            "f": math.inf,
            "s": "-12",
            "t": "",
            "ls": [""],
        },
    ),
    Scenario(
        attrs=RequestAttributes(method="POST", path="/v1/embeddings", body=b"[1, 2, 3]"),
        dyn={
            "x": [1, 2],
            "y": [1.0, 2.0],
            "i": INT_MAX,
            "j": 2,
            "d": 1e300,
            "f": 1e-300,
            "s": "9223372036854775807",
        },
    ),
    Scenario(
        attrs=RequestAttributes(method="POST", path="/v1/chat/completions", body=b'{"max_tokens": NaN}'),
        dyn={"x": "abc", "y": "ABC", "d": -1.5, "s": "1.2.3", "t": "1.2.3"},
    ),
    Scenario(
        attrs=RequestAttributes(
            method="POST", path="/v1/chat/completions", body=b'{"temperature": Infinity}'
        ),
        dyn={"x": True, "y": 1, "i": 7, "j": 0},
    ),
    Scenario(dyn={"x": {"a": None}, "y": {1: "a", 2: "b"}, "xs": [{"a": 1}, [1]], "i": -1}),
    Scenario(
        llm=LlmRequest(model="llama-3-8b", temperature=-0.0, messages=(ChatMessage("user", "hi"),)),
        tenant=Tenant(tier="pro", labels={"region": "", "zone": "b"}),
        backend=BackendStats(name="a", error_rate=-0.0, kv_cache_usage=math.nan, latency_p99_ms=math.inf),
        dyn={"x": 167772161, "y": -0.0, "mm": {"": None}, "s": " 10.0.0.1", "ls": ["a", "a"]},
    ),
]

# Hypothesis: request attributes, bodies with odd or missing fields, tenants, telemetry.

KEYS = st.sampled_from(["a", "b", "k", "x", "model", ""])
WORDS = st.sampled_from(
    ["", "a", "abc", "A", "jane@example.com", "10.0.0.1", "forbidden", "1.2.3", "v2.0.0", "-3", "😀"]
)
# Text that reaches the engine through protobuf messages (headers, bodies, tenants, ...).
TEXT = st.one_of(WORDS, st.text(max_size=12))
# Text handed to the engine as Python str (dyn test variables, `context`, `canary`): without
# NUL, which the engine's activation cuts strings at (see test_engine_cuts_python_strings_at_nul),
# and UTF-8 encodable like TEXT (no lone surrogates: the engine refuses them, and the pipeline
# never passes one, see parse_body).
PY_TEXT = st.one_of(WORDS, st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12))
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 5, INT_MIN, INT_MAX, 2**53 + 1]), st.integers(INT_MIN, INT_MAX)
)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, math.inf, -math.inf, math.nan]), st.floats())
SCALARS = st.one_of(st.none(), st.booleans(), INT64, FLOATS, PY_TEXT)
DYN = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(KEYS, inner, max_size=4),
        st.dictionaries(st.integers(-2, 3), inner, max_size=3),
    ),
    max_leaves=8,
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.sampled_from(["", "m", "user"])
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=6,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), JSON),
            "content": st.one_of(TEXT, st.lists(st.one_of(TEXT, st.fixed_dictionaries({"text": TEXT})))),
        },
    ),
    JSON,
)
BODY = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.one_of(st.sampled_from(["llama-3-70b", "llama-3-8b", "gpt-4o", "m"]), JSON),
            "max_tokens": st.one_of(INT64, FLOATS, JSON),
            "temperature": st.one_of(FLOATS, JSON),
            "stream": st.one_of(st.booleans(), JSON),
            "user": st.one_of(TEXT, JSON),
            "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON),
            "prompt": st.one_of(TEXT, JSON),
            "n": JSON,
            "a": JSON,
        },
    ),
    JSON,
)
HEADERS = st.dictionaries(st.sampled_from(["x", "x-region", "x-a", "authorization", "y"]), TEXT, max_size=4)
LABELS = st.dictionaries(st.sampled_from(["region", "zone", "tier", "a"]), TEXT, max_size=3)
BACKEND = st.builds(
    BackendStats,
    name=st.sampled_from(["a", "b", "c", "embed-a", "llama-70b-a100-a", "llama-70b-v2", "llama-8b-b"]),
    healthy=st.booleans(),
    stale=st.booleans(),
    error_rate=FLOATS,
    latency_p99_ms=FLOATS,
    kv_cache_usage=FLOATS,
    inflight=st.integers(0, 2**40),
    queue_depth=st.integers(-5, 2**40),
    labels=LABELS,
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    body = draw(st.one_of(st.none(), BODY))
    raw = b"" if body is None else json.dumps(body).encode()
    if draw(st.booleans()) and raw:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated or broken JSON
    attrs = RequestAttributes(
        method=draw(st.sampled_from(["GET", "POST"])),
        path=draw(
            st.sampled_from(["/", "/v1/chat/completions", "/v1/embeddings?a=1", "/v1/images/x", "/admin/x"])
        ),
        headers=draw(HEADERS),
        body=raw,
        body_truncated=draw(st.booleans()) and draw(st.booleans()),
        time=draw(st.one_of(st.none(), st.just(NOW))),
        source=Peer(address=draw(st.sampled_from(["", "10.1.2.3", "192.168.0.1", "fd00::1", "bad"]))),
        context=draw(st.dictionaries(st.sampled_from(["k", "a"]), PY_TEXT, max_size=2)),
    )
    llm = None
    if draw(st.booleans()):
        messages = draw(
            st.lists(
                st.builds(ChatMessage, role=st.sampled_from(["system", "user", ""]), content=TEXT), max_size=3
            )
        )
        llm = LlmRequest(
            model=draw(st.sampled_from(["", "llama-3-70b", "llama-3-8b-v2", "gpt-4o"])),
            max_tokens=draw(st.integers(0, 2**62)),
            temperature=draw(FLOATS),
            stream=draw(st.booleans()),
            user=draw(TEXT),
            messages=tuple(messages),
            prompt="\n".join(m.content for m in messages),
            prompt_tokens=draw(st.integers(0, 10**6)),
        )
    tenant = Tenant(
        id=draw(st.sampled_from(["", "acme"])),
        tier=draw(st.sampled_from(["", "free", "pro", "premium"])),
        authenticated=draw(st.booleans()),
        credential=draw(st.sampled_from(["none", "api_key", "invalid_key"])),
        models=tuple(draw(st.lists(st.sampled_from(["llama-3-*", "gpt-4o", "*", "[", ""]), max_size=3))),
        labels=draw(LABELS),
    )
    backends = draw(st.lists(BACKEND, max_size=3))
    snapshot = TelemetrySnapshot(
        backends={s.name: s for s in backends}, load=draw(st.one_of(st.none(), FLOATS))
    )
    dyn = {
        "x": draw(DYN),
        "y": draw(DYN),
        "xs": draw(st.lists(DYN, max_size=4)),
        "mm": draw(st.dictionaries(KEYS, DYN, max_size=3)),
        "i": draw(INT64),
        "j": draw(INT64),
        "d": draw(FLOATS),
        "f": draw(FLOATS),
        "s": draw(PY_TEXT),
        "t": draw(PY_TEXT),
        "b": draw(st.booleans()),
        "ls": draw(st.lists(PY_TEXT, max_size=3)),
    }
    return Scenario(
        attrs=attrs,
        llm=llm,
        tenant=tenant,
        snapshot=snapshot,
        backend=draw(BACKEND),
        canary=draw(st.dictionaries(st.sampled_from(["x", "llama-70b-v2"]), PY_TEXT, max_size=2)),
        dyn=dyn,
    )


# --- comparison ---------------------------------------------------------------------------

_ERROR = "<CelEvalError>"


def _plain(value: Any) -> Any:
    """Protobuf containers (map and repeated fields) as dict and list."""
    if isinstance(value, str | bytes | int | float | bool | Message) or value is None:
        return value
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        return {k: value[k] for k in value}
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return list(value)
    return value


def same(a: Any, b: Any) -> bool:
    """CEL values equal, types kept apart (1 is not 1.0, true is not 1), NaN equal to NaN."""
    a, b = _plain(a), _plain(b)
    if type(a) is float and type(b) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Message) and isinstance(b, Message):
        return a.DESCRIPTOR.full_name == b.DESCRIPTOR.full_name and a.SerializeToString(
            deterministic=True
        ) == b.SerializeToString(deterministic=True)
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(same(p, q) for p, q in zip(a, b, strict=True))
    if type(a) is dict:
        left = {(type(k), k): v for k, v in a.items()}
        right = {(type(k), k): v for k, v in b.items()}
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    return bool(a == b)


def outcome(run: Any) -> tuple[str, Any]:
    try:
        return "value", run()
    except CelEvalError as error:
        return "error", str(error)
    except Exception as error:  # anything else: a failure of the adapter
        return "exception", f"{type(error).__name__}: {error}"


def same_elements(a: Any, b: Any) -> bool:
    """Two lists with the same elements in any order."""
    a, b = _plain(a), _plain(b)
    if type(a) is not list or type(b) is not list or len(a) != len(b):
        return same(a, b)
    rest = list(b)
    for item in a:
        match = next((k for k, other in enumerate(rest) if same(item, other)), None)
        if match is None:
            return False
        del rest[match]
    return True


def agree(left: tuple[str, Any], right: tuple[str, Any], unordered: bool = False) -> bool:
    if left[0] != right[0]:
        return False
    equal = same_elements if unordered else same
    return left[0] == "error" or (left[0] == "value" and equal(left[1], right[1]))


def _shown(value: Any) -> str:
    if isinstance(value, Message):
        return f"{value.DESCRIPTOR.name}{{{text_format.MessageToString(value, as_one_line=True)}}}"
    value = _plain(value)
    if type(value) is list:
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if type(value) is dict:
        return "{" + ", ".join(f"{k!r}: {_shown(v)}" for k, v in value.items()) + "}"
    return repr(value)


Inputs = tuple[dict[str, Any], dict[str, Any]]  # (protobuf values, the pipeline's Python objects)


def inputs(scenario: Scenario) -> Inputs:
    values = scenario.values()
    return values, scenario.views(values)


def mismatches(case: Case, both: Inputs) -> list[str]:
    """Differences between the two programs, by eval and by test: the translated one reading
    protobuf values and reading the pipeline's Python objects, the engine reading protobuf."""
    values, views = both
    found = []
    native_act, engine_act = NATIVE.activation(values), ENGINE.activation(values)
    view_act = NATIVE.activation(views, lambda: values)
    pairs = [
        (
            "eval",
            outcome(lambda: case.native.eval(native_act)),
            outcome(lambda: case.engine.eval(engine_act)),
        ),
        (
            "test",
            outcome(lambda: case.native.test(native_act)),
            outcome(lambda: case.engine.test(engine_act)),
        ),
        (
            "eval on Python objects",
            outcome(lambda: case.native.eval(view_act)),
            outcome(lambda: case.engine.eval(engine_act)),
        ),
    ]
    for how, mine, reference in pairs:
        if not agree(mine, reference, case.source in UNORDERED):
            used = sorted(case.engine.variables())
            inputs = ", ".join(f"{name}={_shown(values[name])}" for name in used if name in values)
            found.append(
                f"{how}({case.source!r}) native={mine[0]}:{_shown(mine[1])} "
                f"engine={reference[0]}:{_shown(reference[1])} inputs: {inputs or '-'}"
            )
    return found


def report(case: Case, pool: list[Inputs]) -> str:
    """The distinct mismatches over a pool of activations (at most five, each with its inputs)."""
    distinct: dict[str, str] = {}
    for both in pool:
        for problem in mismatches(case, both):
            distinct.setdefault(problem.split(" inputs: ")[0], problem)
    return "\n".join(list(distinct.values())[:5])


FIXED_INPUTS = [inputs(scenario) for scenario in FIXED]
FIXED_VALUES = [values for values, _ in FIXED_INPUTS]
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # failures print their inputs already


@pytest.fixture(scope="module")
def random_values() -> list[Inputs]:
    """Activations drawn by hypothesis once, shared by every corpus expression."""
    pool: list[Inputs] = []

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        phases=NO_SHRINK,
        suppress_health_check=list(HealthCheck),
    )
    @given(scenario=scenarios())
    def draw(scenario: Scenario) -> None:
        pool.append(inputs(scenario))

    draw()
    return pool


# --- tests --------------------------------------------------------------------------------


def test_corpus_compiles_in_the_engine() -> None:
    assert not REJECTED, REJECTED
    assert len(CASES) >= 150
    assert {c.source for c in CASES} >= UNORDERED
    assert {c.source for c in CASES} >= EXPECTED_UNTRANSLATED


@pytest.mark.parametrize("case", CASES, ids=[c.source for c in CASES])
def test_fixed_activations(case: Case) -> None:
    problems = report(case, FIXED_INPUTS)
    assert not problems, problems


@pytest.mark.parametrize("case", [c for c in CASES if c.engine.variables()], ids=lambda c: c.source)
def test_random_activations(case: Case, random_values: list[Inputs]) -> None:
    assert len(random_values) >= 50
    problems = report(case, random_values)
    assert not problems, problems


@settings(
    max_examples=50, deadline=None, database=None, phases=NO_SHRINK, suppress_health_check=list(HealthCheck)
)
@given(scenario=scenarios())
def test_one_activation_shared_by_the_whole_corpus(scenario: Scenario) -> None:
    """As in the pipeline, every program reads one activation and its memo of library calls:
    the translated programs answer as they do on a fresh activation each."""
    values = scenario.values()
    shared = NATIVE.activation(values)
    problems = []
    for case in CASES:
        alone = outcome(lambda c=case: c.native.eval(NATIVE.activation(values)))
        together = outcome(lambda c=case: c.native.eval(shared))
        if not agree(together, alone):
            problems.append(f"{case.source!r}: shared={together} fresh={alone}")
    assert not problems, "\n".join(problems)


def test_engine_cuts_python_strings_at_nul() -> None:
    """Not a translation bug: the engine's activation cuts a Python str at NUL (strings inside
    protobuf messages are intact); translated code keeps the value."""
    values = {**FIXED_VALUES[0], "s": "a\x00b", "context": {"k": "a\x00b"}}
    for source in ("s", 'context["k"]'):
        assert NATIVE.compile(source).eval(NATIVE.activation(values)) == "a\x00b"
        assert ENGINE.compile(source).eval(ENGINE.activation(values)) == "a"
    request = BUILDER.request(RequestAttributes(headers={"x": "a\x00b"}), None, False)
    program = ENGINE.compile('request.headers["x"]')
    assert program.eval(ENGINE.activation({**FIXED_VALUES[0], "request": request})) == "a\x00b"


def test_untranslated_expressions() -> None:
    untranslated = [c.source for c in CASES if not c.native.native]
    print("\nnot translated:\n  " + "\n  ".join(untranslated))
    unexpected = sorted(set(untranslated) - EXPECTED_UNTRANSLATED)
    assert not unexpected, f"expressions that left the fast path: {unexpected}"
    assert sum(c.native.native for c in CASES) >= 0.85 * len(CASES)


def test_the_engine_environment_translates_nothing() -> None:
    assert not any(c.engine.native for c in CASES)


# --- the shipped example bundle -----------------------------------------------------------


def programs(node: Any, path: str = "") -> Iterator[tuple[str, Program]]:
    """Every Program of a bundle, with where it lives (rule.when.program, policy.batch, ...)."""
    if isinstance(node, Program):
        yield path, node
    elif isinstance(node, Expr):
        yield path, node.program
    elif isinstance(node, tuple | list):
        for index, item in enumerate(node):
            yield from programs(item, f"{path}[{index}]")
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for spec in dataclasses.fields(node):
            yield from programs(getattr(node, spec.name), f"{path}.{spec.name}" if path else spec.name)


@pytest.fixture(scope="module")
def bundles() -> tuple[Bundle, Bundle]:
    """The example bundle as shipped, and compiled again with the engine running everything."""
    translated = load_bundle(EXAMPLES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "Environment", partial(cel_engine.Environment, native=False))
        reference = load_bundle(EXAMPLES)
    return translated, reference


def test_example_bundle_runs_translated(bundles: tuple[Bundle, Bundle]) -> None:
    translated, _ = bundles
    found = list(programs(translated.policies()))
    assert len(found) > 20
    untranslated = [f"{path}: {program.source}" for path, program in found if not program.native]
    assert not untranslated, "\n".join(untranslated)


def test_reference_bundle_is_the_engine(bundles: tuple[Bundle, Bundle]) -> None:
    _, reference = bundles
    assert not any(program.native for _, program in programs(reference.policies()))


def _bundle_activations(bundle: Bundle, scenario: Scenario, values: dict[str, Any]) -> dict[str, Any]:
    """The activations the pipeline gives a bundle's programs: for conditions, for a route's
    `require` and `score` (with `backend`), for a rollout's `analysis`."""
    stable = scenario.snapshot.backends.get("llama-70b-a100-b")
    analysis = {
        "canary": BUILDER.backend(scenario.backend),
        "stable": BUILDER.backend(stable) if stable else BUILDER.unknown_backend("llama-70b-a100-b"),
        "now": values["now"],
    }
    assert {v.name for v in ANALYSIS_VARIABLES} == set(analysis)
    assert bundle.analysis_env is not None
    return {
        "main": bundle.env.activation(values),
        "backend": bundle.backend_env.activation(values),
        "analysis": bundle.analysis_env.activation(analysis),
    }


def _activation_for(path: str) -> str:
    if path.endswith(".analysis"):
        return "analysis"
    return "backend" if path.endswith((".require", ".score")) else "main"


@settings(
    max_examples=60, deadline=None, database=None, phases=NO_SHRINK, suppress_health_check=list(HealthCheck)
)
@given(scenario=scenarios())
def test_example_bundle_agrees_with_the_engine(bundles: tuple[Bundle, Bundle], scenario: Scenario) -> None:
    translated, reference = bundles
    values = scenario.values()
    mine_acts = _bundle_activations(translated, scenario, values)
    their_acts = _bundle_activations(reference, scenario, values)
    problems = []
    pairs = zip(programs(translated.policies()), programs(reference.policies()), strict=True)
    for (path, mine), (other_path, theirs) in pairs:
        assert path == other_path and mine.source == theirs.source
        which = _activation_for(path)
        left = outcome(lambda m=mine, a=mine_acts[which]: m.eval(a))
        right = outcome(lambda t=theirs, a=their_acts[which]: t.eval(a))
        if not agree(left, right):
            problems.append(f"{path} {mine.source!r}: native={left} engine={right}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        '{"a": 1}["b"] == 1',
        "1 / (i - i) == 1",
        "1 % (i - i) == 1",
        "9223372036854775807 + (i + 1) == 1",
        "[1][i + 5] == 1",
        "dyn(i).x == 1",
        "dyn(mm) < 1",
        "int(9.3e18 + d) == 1",
        'request.headers["absent-a"].contains(request.headers["absent-b"])',  # the receiver's error
        'request.headers["absent-a"].startsWith(request.headers["absent-b"])',
        'optional.none().orValue(request.headers["absent"]) == "x"',
    ],
)
def test_error_texts_read_as_the_engine_words_them(source: str) -> None:
    """Decision logs quote these texts: they must not depend on which path evaluated."""
    native, engine = NATIVE.compile(source), ENGINE.compile(source)
    assert native.native
    values = FIXED_VALUES[0]
    with pytest.raises(CelEvalError) as mine:
        native.eval(NATIVE.activation(values))
    with pytest.raises(CelEvalError) as reference:
        engine.eval(ENGINE.activation(values))
    assert str(mine.value) == str(reference.value)


def test_string_key_lookups_never_fail_on_text_a_protobuf_map_cannot_hold() -> None:
    from policy_engine.cel import native

    backends = BUILDER.telemetry(TelemetrySnapshot({"a": BackendStats("a")}))[0].backends
    assert native._haskey(backends, "a") and not native._haskey(backends, "\ud800")
    assert native._optkey(backends, "\ud800") is native.NONE
    with pytest.raises(native.NativeError, match="NOT_FOUND"):
        native._key(backends, "\ud800")
