"""Loading and compiling policy directories: every error located at file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.policy.compiler import NO_ACCESS_POLICY, BundleError, load_bundle
from policy_engine.policy.source import MAX_DEPTH, MAX_VALUES

HEADER = "apiVersion: policy-engine/v1\n"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def errors_of(directory: Path) -> list[str]:
    with pytest.raises(BundleError) as caught:
        load_bundle(directory)
    return [str(issue) for issue in caught.value.issues]


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_col(path: Path, needle: str, offset: int = 0) -> tuple[int, int]:
    """1-based line and column of `needle` (+offset characters) in a file."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        column = line.find(needle)
        if column >= 0:
            return number, column + 1 + offset
    raise AssertionError(f"{needle!r} not found")


def test_examples_compile(example_bundle: object) -> None:
    from policy_engine.policy.bundle import Bundle

    assert isinstance(example_bundle, Bundle)
    assert len(example_bundle.rule_ids()) >= 25
    assert len(example_bundle.version) == 16


def test_misspelt_field_is_reported_at_the_key(policy_copy: Path) -> None:
    path = policy_copy / "quotas.yaml"
    replace_in(path, "      algorithm: fixed", "      algoritm: fixed")
    line, column = line_col(path, "algoritm")
    (error,) = errors_of(policy_copy)
    assert error.startswith(f"{path}:{line}:{column}: tier-quotas/premium-tokens: unknown field 'algoritm'")


def test_a_reserved_status_is_refused_at_its_value(policy_copy: Path) -> None:
    path = policy_copy / "moderation.yaml"
    replace_in(path, "      status: 413", "      status: 485")
    line, column = line_col(path, "485")
    (error,) = errors_of(policy_copy)
    assert error.startswith(f"{path}:{line}:{column}: ")
    assert "statuses 480-491 are reserved" in error


def test_unknown_variable_points_into_the_expression(policy_copy: Path) -> None:
    path = policy_copy / "access.yaml"
    replace_in(path, "when: tenant.authenticated", "when: tenent.authenticated")
    line, column = line_col(path, "tenent.authenticated")
    (error,) = errors_of(policy_copy)
    prefix = (
        f"{path}:{line}:{column}: api-access/known-tenant: undeclared reference to 'tenent.authenticated'"
    )
    assert error.startswith(prefix)


def test_unknown_field_of_a_typed_variable(policy_copy: Path) -> None:
    path = policy_copy / "routing.yaml"
    replace_in(path, 'when: llm.model == "llama-3-70b-v2"', 'when: llm.modle == "llama-3-70b-v2"')
    line, column = line_col(path, "llm.modle", offset=3)
    (error,) = errors_of(policy_copy)
    assert f"{path}:{line}:{column}: model-routing/pinned-v2: undefined field 'modle'" in error


def test_cel_syntax_error(policy_copy: Path) -> None:
    path = policy_copy / "moderation.yaml"
    replace_in(path, "when: pii.card(llm.prompt) || pii.iban(llm.prompt)", "when: pii.card(llm.prompt) ||| x")
    (error,) = errors_of(policy_copy)
    line, _ = line_col(path, "pii.card(llm.prompt) |||")
    assert error.startswith(f"{path}:{line}:")
    assert "prompt-safety/payment-card" in error and "Syntax error" in error


def test_type_error(policy_copy: Path) -> None:
    path = policy_copy / "quotas.yaml"
    replace_in(path, 'when: tenant.tier == "free"', "when: tenant.tier == 7")
    line, column = line_col(path, "tenant.tier == 7", offset=len("tenant.tier "))
    errors = errors_of(policy_copy)
    assert errors[0].startswith(
        f"{path}:{line}:{column}: tier-quotas/free-requests: found no matching overload"
    )


def test_non_bool_condition_is_a_type_error(policy_copy: Path) -> None:
    path = policy_copy / "access.yaml"
    replace_in(path, "when: tenant.authenticated", "when: tenant.id")
    (error,) = errors_of(policy_copy)
    assert "expression must be bool, but it is string" in error


def test_error_inside_a_block_scalar(policy_copy: Path) -> None:
    path = policy_copy / "routing.yaml"
    replace_in(
        path, "backend.kv_cache_usage * 100.0 + backend.latency_p99_ms / 100.0", "backend.kv_cache * 1.0"
    )
    line, column = line_col(path, "backend.kv_cache * 1.0", offset=len("backend"))
    (error,) = errors_of(policy_copy)
    assert error.startswith(f"{path}:{line}:{column}: model-routing/premium-70b: undefined field 'kv_cache'")


def test_all_errors_of_a_directory_in_one_run(policy_copy: Path) -> None:
    replace_in(policy_copy / "quotas.yaml", "      algorithm: fixed", "      algoritm: fixed")
    replace_in(policy_copy / "access.yaml", "when: tenant.authenticated", "when: tenent.authenticated")
    replace_in(policy_copy / "canary.yaml", "weight: 10", "weight: 150")
    write(policy_copy, "broken.yaml", "apiVersion: policy-engine/v1\nkind: [oops\n")
    errors = errors_of(policy_copy)
    assert len(errors) == 4
    assert any("broken.yaml:3:1: YAML syntax error" in e for e in errors)
    assert any(
        "canary.yaml" in e and "spec.weight: Input should be less than or equal to 100" in e for e in errors
    )


def test_unknown_kind_and_duplicate_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEADER + "kind: Gadget\nmetadata: {name: a}\nspec: {}\n")
    rule = "  rules: [{name: r, effect: allow, when: 'true'}]\n"
    write(tmp_path, "b.yaml", HEADER + "kind: AccessPolicy\nmetadata: {name: same}\nspec:\n" + rule)
    write(tmp_path, "c.yaml", HEADER + "kind: AccessPolicy\nmetadata: {name: same}\nspec:\n" + rule)
    errors = errors_of(tmp_path)
    assert any(e.startswith(f"{tmp_path}/a.yaml:2:7: kind must be one of") for e in errors)
    assert any(e.startswith(f"{tmp_path}/c.yaml:3:18: same: policy name already used at") for e in errors)


def test_duplicate_rule_names_in_a_policy(tmp_path: Path) -> None:
    """Rule ids name coverage and findings, and a limit's id its counters: each is one rule."""
    access = "kind: AccessPolicy\nmetadata: {name: acc}\nspec:\n  rules:\n"
    access += "    - {name: r, effect: allow, when: 'true'}\n    - {name: r, effect: deny, when: 'false'}\n"
    write(tmp_path, "a.yaml", HEADER + access)
    routing = "kind: RoutingPolicy\nmetadata: {name: rt}\nspec:\n"
    routing += "  shedding: [{name: x, when: 'false'}]\n  routes: [{name: x, candidates: [b]}]\n"
    write(tmp_path, "r.yaml", HEADER + routing)
    quota = "kind: QuotaPolicy\nmetadata: {name: q}\nspec:\n  limits:\n"
    quota += "    - {name: l, key: 'tenant.id', requests: {limit: 1, window: 1m}}\n" * 2
    write(tmp_path, "q.yaml", HEADER + quota)
    other = "kind: AccessPolicy\nmetadata: {name: other}\nspec:\n"
    other += "  rules: [{name: r, effect: allow, when: 'true'}]\n"
    write(tmp_path, "o.yaml", HEADER + other)  # the same rule name in another policy is another rule
    errors = errors_of(tmp_path)
    assert any(
        e.startswith(f"{tmp_path}/a.yaml:7:14: acc/r: rule name already used at {tmp_path}/a.yaml:6:14")
        for e in errors
    ), errors
    assert any(e.startswith(f"{tmp_path}/r.yaml:6:19: rt/x: rule name already used at") for e in errors), (
        errors
    )
    assert any(e.startswith(f"{tmp_path}/q.yaml:7:14: q/l: rule name already used at") for e in errors), (
        errors
    )
    assert len(errors) == 3, errors


def test_tenant_ids_and_principals_are_unique_across_tenant_sets(tmp_path: Path) -> None:
    def tenant_set(name: str, tenant: str, principal: str) -> str:
        spec = f"spec:\n  tenants:\n    - id: {tenant}\n      principals: [{principal}]\n"
        return HEADER + f"kind: TenantSet\nmetadata: {{name: {name}}}\n" + spec

    write(tmp_path, "a.yaml", tenant_set("a", "acme", "spiffe://x/ns/a/sa/a"))
    write(tmp_path, "b.yaml", tenant_set("b", "acme", "spiffe://x/ns/b/sa/b"))
    write(tmp_path, "c.yaml", tenant_set("c", "globex", "spiffe://x/ns/a/sa/a"))
    errors = errors_of(tmp_path)
    assert errors == [
        f"{tmp_path}/b.yaml:6:11: tenant 'acme' already defined at {tmp_path}/a.yaml:6:11",
        f"{tmp_path}/c.yaml:7:20: principal 'spiffe://x/ns/a/sa/a' already given to a tenant at "
        f"{tmp_path}/a.yaml:7:20",
    ]


def test_a_directory_without_an_access_policy_is_refused(tmp_path: Path) -> None:
    assert errors_of(tmp_path) == [f"{tmp_path}: {NO_ACCESS_POLICY}"]
    routing = "kind: RoutingPolicy\nmetadata: {name: r}\nspec:\n  routes: [{name: a, candidates: [b]}]\n"
    write(tmp_path, "r.yaml", HEADER + routing)
    assert errors_of(tmp_path) == [f"{tmp_path}: {NO_ACCESS_POLICY}"]
    assert load_bundle(tmp_path, deciding=False).routing  # the canary controller decides no access
    write(
        tmp_path,
        "a.yaml",
        HEADER
        + "kind: AccessPolicy\nmetadata: {name: a}\n"
        + "spec: {rules: [{name: all, effect: allow, when: 'true'}]}\n",
    )
    assert load_bundle(tmp_path).access


def test_aliases_expanding_without_bound_are_refused(tmp_path: Path) -> None:
    """A few lines of nested YAML aliases would expand to a million values and exhaust memory."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    path = write(tmp_path, "bomb.yaml", HEADER + "kind: AccessPolicy\n" + "\n".join(lines) + "\n")
    errors = errors_of(tmp_path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:"), errors
    assert f"YAML error: more than {MAX_VALUES} values in one document (aliases expanding?)" in errors[0]


def test_nesting_too_deep_is_refused(tmp_path: Path) -> None:
    deep = write(tmp_path, "deep.yaml", HEADER + "kind: AccessPolicy\nspec: " + "[" * 100 + "]" * 100 + "\n")
    deeper = write(
        tmp_path, "deeper.yaml", HEADER + "kind: AccessPolicy\nspec: " + "[" * 5000 + "]" * 5000 + "\n"
    )
    errors = errors_of(tmp_path)
    assert f"{deep}:3:" in errors[0] and f"nested deeper than {MAX_DEPTH} levels" in errors[0], errors
    assert errors[1] == f"{deeper}:1:1: YAML error: nested too deeply", errors


def test_a_literal_argument_a_function_would_always_refuse_is_a_load_error(policy_copy: Path) -> None:
    """It would fail every evaluation: with on_error: deny, deny every request the rule sees."""
    rules = {
        "cidr": 'net.in_cidr(source.address, "10.0.0.0/33")',
        "cidrs": 'net.in_cidr(source.address, ["10.0.0.0/8", "nope"])',
        "range": 'semver.satisfies("1.2.3", ">=1.0, <2")',
        "version": 'semver.compare(request.headers[?"x-v"].orValue("1.0.0"), "banana") > 0',
        "fine": 'semver.satisfies(request.headers[?"x-v"].orValue("1.0.0"), ">=1.0.0, <2.0.0")',
    }
    text = HEADER + "kind: AccessPolicy\nmetadata: {name: lit}\nspec:\n  rules:\n"
    text += "".join(
        f"    - name: {name}\n      effect: deny\n      when: '{when}'\n" for name, when in rules.items()
    )
    write(policy_copy, "lit.yaml", text)
    errors = [e.split(" in `when`")[0] for e in errors_of(policy_copy)]
    assert errors == [
        f"{policy_copy}/lit.yaml:8:14: lit/cidr: net.in_cidr(): invalid CIDR block: '10.0.0.0/33'",
        f"{policy_copy}/lit.yaml:11:14: lit/cidrs: net.in_cidr(): invalid CIDR block: 'nope'",
        f"{policy_copy}/lit.yaml:14:14: lit/range: semver.satisfies(): invalid semantic version: '1.0' in "
        "constraint '>=1.0, <2'",
        f"{policy_copy}/lit.yaml:17:14: lit/version: semver.compare(): invalid semantic version: 'banana'",
    ]


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEADER + "kind: AccessPolicy\nkind: AccessPolicy\nmetadata: {name: a}\n")
    assert any("a.yaml:3:1: duplicate key 'kind'" in e for e in errors_of(tmp_path))


def test_unknown_term_list(policy_copy: Path) -> None:
    path = policy_copy / "moderation.yaml"
    replace_in(path, 'terms.any(llm.prompt, "blocked")', 'terms.any(llm.prompt, "blokked")')
    line, column = line_col(path, '"blokked"', offset=1)
    (error,) = errors_of(policy_copy)
    assert error.startswith(
        f"{path}:{line}:{column}: prompt-safety/blocked-terms: no term list named 'blokked'"
    )


def test_score_may_only_use_backend_in_routes(policy_copy: Path) -> None:
    replace_in(policy_copy / "access.yaml", "when: tenant.authenticated", "when: backend.healthy")
    (error,) = errors_of(policy_copy)
    assert "undeclared reference to 'backend.healthy'" in error


def test_bad_duration(policy_copy: Path) -> None:
    path = policy_copy / "quotas.yaml"
    replace_in(path, "window: 1m}", "window: 1 minute}")
    (error,) = errors_of(policy_copy)
    assert "invalid duration '1 minute'" in error and "tier-quotas/free-requests" in error


@pytest.mark.parametrize("window", [".nan", ".inf", "-.inf", "0"])
def test_a_window_must_be_a_positive_finite_duration(policy_copy: Path, window: str) -> None:
    # YAML's .nan and .inf are floats: a window of either would break the counters' arithmetic.
    replace_in(policy_copy / "quotas.yaml", "window: 1m}", f"window: {window}}}")
    (error,) = errors_of(policy_copy)
    assert "a duration must be a positive, finite number of seconds" in error


def test_bundle_version_is_a_content_hash(policy_copy: Path) -> None:
    first = load_bundle(policy_copy).version
    assert load_bundle(policy_copy).version == first
    replace_in(policy_copy / "quotas.yaml", "limit: 20,", "limit: 21,")
    assert load_bundle(policy_copy).version != first


def test_test_files_are_not_policies(policy_copy: Path) -> None:
    write(policy_copy, "extra_test.yaml", "tests: not a policy\n")
    load_bundle(policy_copy)


def test_missing_directory(tmp_path: Path) -> None:
    errors = errors_of(tmp_path / "nope")
    assert errors == [f"{tmp_path / 'nope'}:1:1: not a directory"]


@pytest.mark.parametrize(
    "quoted",
    [
        r'"llm.model == \"a\" && tenant.tierr == \"x\""',
        r'"llm.model == \u0022a\u0022 && tenant.tierr == \"x\""',
        "'llm.model == ''a'' && tenant.tierr == ''x'''",
    ],
)
def test_an_error_in_a_quoted_expression_with_escapes(policy_copy: Path, quoted: str) -> None:
    """Escapes are one character of the expression and several of the file."""
    path = policy_copy / "routing.yaml"
    replace_in(path, 'when: llm.model == "llama-3-70b-v2"', f"when: {quoted}")
    line, column = line_col(path, "tenant.tierr", offset=6)
    (error,) = errors_of(policy_copy)
    assert f"{path}:{line}:{column}: model-routing/pinned-v2: undefined field 'tierr'" in error, error


def test_an_error_on_a_later_line_of_a_quoted_expression_with_escapes(policy_copy: Path) -> None:
    path = policy_copy / "routing.yaml"
    replace_in(
        path,
        'when: llm.model == "llama-3-70b-v2"',
        'when: "llm.model == \\u0022a\\u0022 ||\n        llm.model == \\"b\\" && tenant.tierr == \\"x\\""',
    )
    line, column = line_col(path, "tenant.tierr", offset=6)
    (error,) = errors_of(policy_copy)
    assert f"{path}:{line}:{column}: model-routing/pinned-v2: undefined field 'tierr'" in error, error


def test_a_column_after_other_characters_counts_characters(policy_copy: Path) -> None:
    """A byte that is not UTF-8, after 'é' (two bytes, one character) on its line."""
    path = policy_copy / "access.yaml"
    lines = path.read_bytes().split(b"\n")
    lines[2] += " # é".encode() + b" \xff"
    path.write_bytes(b"\n".join(lines))
    (error,) = errors_of(policy_copy)
    column = len(lines[2].decode("utf-8", "replace"))  # the byte is the line's last character
    assert error.startswith(f"{path}:3:{column}: not UTF-8: byte 0xff"), error
