"""Policy unit tests (`*_test.yaml`) and `eval` inputs that stub the tenant instead of resolving it."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from policy_engine.decide.pipeline import TENANT_HEADER, Pipeline
from policy_engine.policy.compiler import load_bundle
from policy_engine.policy.testing import DecisionInput, run_tests, schema_of_test_files
from tests.conftest import POLICIES

CHAT_70B = {"model": "llama-3-70b-instruct", "messages": [{"role": "user", "content": "Hello"}]}
BACKENDS = {"llama-70b-h100-a": {}, "llama-70b-eu": {}, "llama-70b-a100-a": {}}


@pytest.fixture
def without_tenant_set(policy_copy: Path) -> Path:
    """The example policies deployed as the chart deploys them: tenants come from elsewhere."""
    (policy_copy / "tenants.yaml").unlink()
    for test in policy_copy.glob("*_test.yaml"):
        test.unlink()
    return policy_copy


def write_tests(directory: Path, tests: list[dict[str, object]]) -> None:
    suite = {
        "name": "stubs",
        "defaults": {"request": {"body": CHAT_70B}, "telemetry": {"backends": BACKENDS}},
    }
    (directory / "stubs_test.yaml").write_text(yaml.safe_dump({**suite, "tests": tests}))


def test_a_stubbed_tenant_is_decided_on_without_a_tenant_set(without_tenant_set: Path) -> None:
    write_tests(
        without_tenant_set,
        [
            {
                "name": "a premium tenant gets the H100s",
                "input": {"tenant": {"id": "acme", "tier": "premium"}},
                "expect": {
                    "allowed": True,
                    "tenant": "acme",
                    "route": "llama-70b-h100-a",
                    "headers": {TENANT_HEADER: "acme"},
                    "fired": ["api-access/known-tenant", "model-routing/premium-70b"],
                },
            },
            {
                "name": "a tenant's labels reach the routing",
                "input": {"tenant": {"id": "eurobank", "tier": "pro", "labels": {"region": "eu"}}},
                "expect": {"route": "llama-70b-eu", "fired": ["model-routing/eu-residency"]},
            },
            {
                "name": "the stub's plan is checked",
                "input": {"tenant": {"id": "hobbyist", "models": ["llama-3-8b*"]}},
                "expect": {"allowed": False, "status": 403, "reason": "model_not_allowed"},
            },
            {
                "name": "without a stub and a TenantSet nobody is known",
                "input": {"request": {"headers": {"authorization": "Bearer sk-acme-premium-key-0001"}}},
                "expect": {"allowed": False, "reason": "invalid_api_key"},
            },
        ],
    )
    report = run_tests(load_bundle(without_tenant_set), without_tenant_set)
    assert not report.issues
    assert [(r.name, r.failures) for r in report.results if r.failures] == []
    assert report.passed == 4


def test_a_stub_wins_over_the_tenant_sets_and_the_request(policy_copy: Path) -> None:
    """With a TenantSet, the stub still decides who calls: a wrong key is not looked up."""
    bundle = load_bundle(policy_copy)
    request = {
        "request": {"headers": {"authorization": "Bearer sk-wrong-key-00000000"}, "body": CHAT_70B},
        "telemetry": {"backends": BACKENDS},
    }
    resolved = DecisionInput.model_validate(request).decide(Pipeline(bundle))
    assert (resolved.allowed, resolved.reason) == (False, "invalid_api_key")
    stubbed_input = DecisionInput.model_validate(
        {**request, "tenant": {"id": "globex", "tier": "pro", "credential": "principal"}}
    )
    stubbed = stubbed_input.decide(Pipeline(bundle))
    assert (stubbed.allowed, stubbed.tenant, stubbed.route) == (True, "globex", "llama-70b-a100-a")


def test_a_stub_without_a_tenant_id_fails_its_case(without_tenant_set: Path) -> None:
    write_tests(
        without_tenant_set,
        [
            {"name": "no id", "input": {"tenant": {"tier": "pro"}}, "expect": {"allowed": True}},
            {
                "name": "not a credential",
                "input": {"tenant": {"id": "a", "credential": "invalid_key"}},
                "expect": {"allowed": False},
            },
        ],
    )
    report = run_tests(load_bundle(without_tenant_set), without_tenant_set)
    failures = {r.name: r.failures for r in report.results}
    assert any("input tenant.id: Field required" in f for f in failures["no id"]), failures
    assert any("input tenant.credential:" in f for f in failures["not a credential"]), failures


def test_the_schema_of_test_files_describes_their_inputs() -> None:
    """An editor given `schema --tests` accepts the example tests and flags a misspelled input."""
    schema = schema_of_test_files()
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(POLICIES.glob("*_test.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert list(validator.iter_errors(document)) == [], path

    def errors(test_input: dict[str, object]) -> list[str]:
        document = {"tests": [{"name": "t", "input": test_input, "expect": {"allowed": True}}]}
        return [error.message for error in validator.iter_errors(document)]

    assert errors({"request": {"heders": {"x": "1"}}}) == [
        "Additional properties are not allowed ('heders' was unexpected)"
    ]
    assert errors({"tenant": {"tier": "pro"}}) == []  # partial: the id may come from the defaults
    assert errors({"tenant": {"id": "a", "credential": "invalid_key"}}) != []
    assert errors({"telemetry": {"backends": {"a": {"queue_depth": "deep"}}}}) != []


def test_names_the_policies_do_not_have_fail_the_case(policy_copy: Path) -> None:
    """A misspelled rule passed as not_fired, and misspelled usage was silently ignored."""
    for test in policy_copy.glob("*_test.yaml"):
        test.unlink()
    free = {"request": {"headers": {"authorization": "Bearer sk-hobby-free-key-0003"}}}
    write_tests(
        policy_copy,
        [
            {"name": "rule", "input": free, "expect": {"not_fired": ["prompt-safety/prompt-injektion"]}},
            {
                "name": "limit",
                "input": {**free, "quota": {"tier-quota/free-requests": {"requests": 20}}},
                "expect": {},
            },
            {
                "name": "kind",
                "input": {**free, "quota": {"tier-quotas/free-requests": {"request": 20}}},
                "expect": {},
            },
            {"name": "canary", "input": {**free, "canary_weights": {"llama-70-v2": 100}}, "expect": {}},
            {"name": "default", "expect": {"fired": ["api-access/default"], "allowed": False}},
        ],
    )
    report = run_tests(load_bundle(policy_copy), policy_copy)
    failures = {r.name: r.failures for r in report.results}
    assert failures["rule"] == ["expect.not_fired: no rule 'prompt-safety/prompt-injektion' in the policies"]
    assert failures["limit"] == ["input quota: no quota limit 'tier-quota/free-requests' in the policies"]
    assert failures["kind"] and "input quota.tier-quotas/free-requests.request:" in failures["kind"][0]
    assert failures["canary"] == ["input canary_weights: no CanaryPolicy 'llama-70-v2'"]
    assert failures["default"] == []  # a policy's default is a name a test may expect


def test_a_misspelled_input_field_is_located(without_tenant_set: Path) -> None:
    path = without_tenant_set / "located_test.yaml"
    path.write_text(
        "name: located\n"
        "defaults:\n"
        "  request: {body: {model: m}, heders: {a: b}}\n"
        "tests:\n"
        "  - name: in the test\n"
        "    input:\n"
        "      request: {path: /v1/x, methd: GET}\n"
        "    expect: {allowed: true}\n"
    )
    report = run_tests(load_bundle(without_tenant_set), without_tenant_set)
    (result,) = report.results
    assert sorted(result.failures) == [
        f"{path}:3:31: input request.heders: Extra inputs are not permitted",
        f"{path}:7:30: input request.methd: Extra inputs are not permitted",
    ], result.failures


def test_a_byte_that_is_not_utf8_is_located(tmp_path: Path, policy_copy: Path) -> None:
    from policy_engine.policy.compiler import BundleError

    path = policy_copy / "access.yaml"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2] + b" # caf\xe9"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(BundleError) as caught:
        load_bundle(policy_copy)
    column = len(lines[2]) - 1 + 1  # the byte's own column
    assert [str(i) for i in caught.value.issues] == [
        f"{path}:3:{column}: not UTF-8: byte 0xe9 (invalid continuation byte); save the file as UTF-8"
    ]
