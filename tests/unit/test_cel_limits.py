"""CEL safety: expressions that could hang a worker are rejected at load with file:line:col.

The engine's own limits (parse depth, source size, comprehension iterations, RE2) are checked
here too, so that an upgrade that drops one of them is noticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy_engine.cel.cost import INPUT, MAX_VALUE, MAX_WORK
from policy_engine.cel.engine import CelCompileError, CelEvalError, Environment
from policy_engine.cel.functions import library_functions
from policy_engine.cel.schema import VARIABLES
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import BundleError, load_bundle

HEADER = "apiVersion: policy-engine/v1\n"
TENANTS = HEADER + "kind: TenantSet\nmetadata: {name: t}\nspec:\n  tenants: [{id: t1}]\n"


def doubled(times: int) -> str:
    expression = "llm.prompt"
    for level in range(times):
        expression = f"cel.bind(x{level}, {expression}, x{level} + x{level})"
    return f"size({expression}) > 0"


@pytest.fixture(scope="module")
def env() -> Environment:
    return Environment(library_functions({}), VARIABLES)


SAFE = [
    "pii.any(llm.prompt)",
    'llm.model == "m" && tenant.tier == "free"',
    "llm.messages.exists(m, pii.any(m.content))",
    'size(llm.messages.filter(m, m.role == "user")) > 1',
    'llm.prompt.replace("secret", "******").size() > 0',
    "telemetry.backends.all(n, telemetry.backends[n].healthy)",
    'llm.prompt.lowerAscii().matches("ignore (all|previous) instructions")',
    doubled(3),
]

COSTLY = {
    "quadratic scan": "llm.messages.exists(m, m.content.contains(llm.prompt))",
    "nested loops": "llm.messages.all(a, llm.messages.all(b, a.role == b.role))",
    "copy per element": "size(llm.messages.map(m, llm.prompt)) > 0",
    "replace by request text": 'llm.prompt.replace("", llm.prompt).size() > 0',
    "doubling": doubled(7),
}


@pytest.mark.parametrize("source", SAFE)
def test_ordinary_expressions_are_within_limits(env: Environment, source: str) -> None:
    report = env.compile(source).cost()
    assert report.problem is None, report
    assert report.size <= MAX_VALUE and report.work <= MAX_WORK


@pytest.mark.parametrize("name", sorted(COSTLY))
def test_costly_expressions_have_a_problem(env: Environment, name: str) -> None:
    report = env.compile(COSTLY[name]).cost()
    assert report.problem is not None
    assert report.size > MAX_VALUE or report.work > MAX_WORK


def test_doubling_is_bounded_by_the_number_of_doublings(env: Environment) -> None:
    sizes = [env.compile(doubled(n)).cost().size for n in range(1, 5)]
    assert sizes == [2 * INPUT, 4 * INPUT, 8 * INPUT, 16 * INPUT]


def write_access(directory: Path, rules: list[tuple[str, str]]) -> Path:
    lines = [HEADER + "kind: AccessPolicy\nmetadata: {name: a}\nspec:\n  rules:\n"]
    for name, when in rules:
        lines.append(f"    - name: {name}\n      effect: deny\n      when: {json.dumps(when)}\n")
    (directory / "tenants.yaml").write_text(TENANTS)
    (directory / "a.yaml").write_text("".join(lines))
    return directory


def load_errors(directory: Path) -> list[str]:
    with pytest.raises(BundleError) as raised:
        load_bundle(directory)
    return [str(issue) for issue in raised.value.issues]


def test_costly_rules_are_load_errors_with_positions(tmp_path: Path) -> None:
    rules = [(name.replace(" ", "-"), source) for name, source in sorted(COSTLY.items())]
    errors = load_errors(write_access(tmp_path, rules))
    assert len(errors) == len(rules)
    for index, (name, _) in enumerate(rules):
        line = 8 + 3 * index  # the `when:` line of rule `index`; the expression starts after `"`
        assert any(f"a.yaml:{line}:14" in e and f"a/{name}" in e for e in errors), (name, errors)


def test_patterns_must_be_valid_literal_and_bounded(tmp_path: Path) -> None:
    errors = load_errors(
        write_access(
            tmp_path,
            [
                ("bad-repeat", 'llm.prompt.matches("a{2000}")'),
                ("computed", 'llm.prompt.matches(request.headers["x-pattern"])'),
                ("long", 'llm.prompt.matches("' + "a|" * 1100 + 'a")'),
                ("unbalanced", 'llm.prompt.matches("(abc")'),
            ],
        )
    )
    joined = "\n".join(errors)
    assert "a/bad-repeat: bad matches() pattern: invalid regular expression" in joined
    assert "a/computed: matches() needs a string literal pattern" in joined
    assert "a/long: matches() pattern of 2201 characters (limit 2048)" in joined
    assert "a/unbalanced: bad matches() pattern" in joined


def test_engine_limits_are_compile_errors_not_crashes(env: Environment) -> None:
    with pytest.raises(CelCompileError, match="recursion"):
        env.compile("(" * 200 + "true" + ")" * 200)
    with pytest.raises(CelCompileError, match="codepoint limit"):
        env.compile(" || ".join(["true"] * 30_000))


def test_iteration_budget_is_an_evaluation_error(env: Environment) -> None:
    """The engine's comprehension budget is the second line: loops over constants stop too."""
    digits = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    nested = "a + b + c + d + e"
    for var in "edcba":
        nested = f"{digits}.map({var}, {nested})"
    program = env.compile(f"size({nested}) > 0")
    assert program.cost().problem is not None  # rejected at load in a policy file
    with pytest.raises(CelEvalError, match="budget"):
        program.eval(env.activation({}))


def test_the_canary_variable_is_only_known_in_routes(tmp_path: Path) -> None:
    """Its value is set by the canary stage, after access, moderation, shedding and quota."""
    errors = load_errors(write_access(tmp_path, [("early", 'canary[?"c"].orValue("") == "canary"')]))
    assert len(errors) == 1
    assert "a/early: the `canary` variable is only known in routing routes" in errors[0]
    assert ":8:14:" in errors[0]


def test_a_long_chain_of_comparisons_with_literals_is_cheap(example_bundle: Bundle) -> None:
    """Equality compares lengths first, then at most the shorter side: 260 `llm.model == "mN"`
    terms are no loop over the request (they were refused as 260 passes over it)."""
    chain = " || ".join(f'llm.model == "m{i}"' for i in range(260))
    assert example_bundle.env.compile(chain, "bool").cost().problem is None
    square = "request.body.messages.all(m, request.body.messages.exists(n, n.content == m.content))"
    assert "grow with the square" in (example_bundle.env.compile(square, "bool").cost().problem or "")
