"""The command line, run as a user runs it (a real subprocess of the console script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import POLICIES, ROOT

CLI = [sys.executable, "-m", "policy_engine"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


def test_check_passes_on_the_examples() -> None:
    result = run("check", str(POLICIES))
    assert result.returncode == 0, result.stderr
    assert re.match(r"ok: \d+ file\(s\), \d+ policies, \d+ rules, bundle [0-9a-f]{16}", result.stdout)


def test_check_names_expressions_left_to_the_engine(policy_copy: Path) -> None:
    examples = run("check", str(POLICIES))
    total = int(re.search(r"(\d+) of (\d+) expressions run as Python", examples.stdout).group(2))  # type: ignore[union-attr]
    assert f"{total} of {total} expressions run as Python" in examples.stdout
    (policy_copy / "hours.yaml").write_text(
        "apiVersion: policy-engine/v1\nkind: AccessPolicy\nmetadata: {name: hours}\nspec:\n  rules:\n"
        "    - {name: late, effect: deny, when: 'request.time.getHours() > 22'}\n"
    )
    result = run("check", str(policy_copy))
    assert result.returncode == 0, result.stderr
    assert f"{total} of {total + 1} expressions run as Python" in result.stdout
    assert f"in the CEL engine: {policy_copy / 'hours.yaml'}:6:" in result.stdout


def test_check_fails_with_positions(policy_copy: Path) -> None:
    path = policy_copy / "access.yaml"
    path.write_text(path.read_text().replace("default: deny", "defualt: deny"))
    result = run("check", str(policy_copy))
    assert result.returncode == 1
    assert f"{path}:7:3: api-access: unknown field 'defualt'" in result.stderr


def test_text_in_square_brackets_is_printed_as_it_is(policy_copy: Path) -> None:
    """Policies, test names and patterns are text: "[/INST]" (Llama's prompt syntax) is no markup."""
    head = "apiVersion: policy-engine/v1\nkind: AccessPolicy\nmetadata: {name: NAME}\nspec:\n  rules:\n"
    (policy_copy / "inst.yaml").write_text(
        head.replace("NAME", "inst")
        + '    - {name: r, effect: deny, when: \'llm.prompt.contains("[/INST]") && tenant.tierr == "x"\'}\n'
    )
    (policy_copy / "upper.yaml").write_text(
        head.replace("NAME", "upper") + "    - {name: R10, effect: deny}\n"
    )
    result = run("check", str(policy_copy))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert 'llm.prompt.contains("[/INST]")' in result.stderr, result.stderr
    assert "'^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$'" in result.stderr, result.stderr  # the pattern R10 missed
    (policy_copy / "inst.yaml").unlink()
    (policy_copy / "upper.yaml").unlink()
    (policy_copy / "inst_test.yaml").write_text(
        "tests:\n  - name: '[/INST] tags are [bold]stripped'\n    expect: {allowed: true}\n"
    )
    result = run("test", str(policy_copy))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[/INST] tags are [bold]stripped" in result.stdout


def test_example_policy_tests_pass_with_full_coverage() -> None:
    result = run("test", str(POLICIES), "--require-coverage", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == 0 and not report["issues"]
    assert report["passed"] >= 40
    assert report["uncovered"] == []
    assert all(count > 0 for count in report["coverage"].values())


def test_a_failing_policy_test_fails_the_run(policy_copy: Path) -> None:
    path = policy_copy / "quotas.yaml"
    path.write_text(
        path.read_text().replace("requests: {limit: 20, window: 1m}", "requests: {limit: 25, window: 1m}")
    )
    result = run("test", str(policy_copy))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "the 21st free request in a minute gets 429" in result.stdout
    assert "x-ratelimit-limit: expected '20', got '25'" in result.stdout


def test_the_summary_counts_test_files_that_did_not_load(policy_copy: Path) -> None:
    (policy_copy / "broken_test.yaml").write_text("tests:\n  - name: x\n    input: {\n")
    result = run("test", str(policy_copy))
    assert result.returncode == 1
    assert "broken_test.yaml:4:1: YAML syntax error" in result.stderr
    assert result.stdout.rstrip().endswith("0 failed, 1 error(s) in test files (their tests did not run)")
    nothing = run("test", str(POLICIES), "--run", "no such test")
    assert nothing.returncode == 1 and "no test in" in nothing.stderr and "'no such test'" in nothing.stderr


def test_uncovered_rules_are_listed(policy_copy: Path) -> None:
    (policy_copy / "routing_test.yaml").unlink()
    result = run("test", str(policy_copy), "--require-coverage")
    assert result.returncode == 1
    assert "never fired:" in result.stdout and "model-routing/shed-free" in result.stdout


def test_eval_explains_a_decision(tmp_path: Path) -> None:
    request = {
        "request": {
            "headers": {"authorization": "Bearer sk-hobby-free-key-0003"},
            "body": {"model": "llama-3-8b-instruct", "messages": [{"role": "user", "content": "hi"}]},
        },
        "quota": {"tier-quotas/free-requests": {"requests": 20}},
    }
    path = tmp_path / "input.json"
    path.write_text(json.dumps(request))
    result = run("eval", str(POLICIES), "--input", str(path), "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["allowed"] is False and decision["status"] == 429
    assert {
        "policy": "tier-quotas",
        "rule": "free-requests",
        "effect": "deny",
        "dry_run": False,
        "detail": "hobbyist",
    } in decision["fired"]
    assert json.loads(decision["body"])["error"]["code"] == "rate_limit_exceeded"
    text = run("eval", str(POLICIES), "--input", str(path))
    assert "DENY 429" in text.stdout and "free-requests" in text.stdout


def test_eval_says_why_it_cannot_read_its_input(tmp_path: Path) -> None:
    binary = tmp_path / "input.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    for path in ("/nonexistent/input.yaml", str(tmp_path), str(binary)):
        result = run("eval", "-i", path, str(POLICIES))
        assert result.returncode == 2, (path, result.stderr)
        assert f"cannot read the input {path}" in result.stderr and "Traceback" not in result.stderr


def test_eval_explains_a_decision_without_telemetry(tmp_path: Path) -> None:
    """Without telemetry every backend is stale: the routed request is refused, and eval says why."""
    body = {"model": "llama-3-8b-instruct", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-hobby-free-key-0003"}
    chat = {"method": "POST", "path": "/v1/chat/completions", "headers": headers, "body": body}
    request = {"request": chat}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(request))
    result = run("eval", "-i", str(path), str(POLICIES))
    assert "no_backend_available" in result.stdout, result.stdout + result.stderr
    assert "the input gives no telemetry" in result.stderr


def test_eval_takes_a_stubbed_tenant(tmp_path: Path) -> None:
    body = {"model": "llama-3-70b-instruct", "messages": [{"role": "user", "content": "hi"}]}
    request = {
        "request": {"body": body},
        "tenant": {"id": "eurobank", "tier": "pro", "labels": {"region": "eu"}},
        "telemetry": {"backends": {"llama-70b-eu": {}, "llama-70b-a100-a": {}}},
    }
    path = tmp_path / "input.yaml"
    path.write_text(json.dumps(request))
    result = run("eval", "--json", "-i", str(path), str(POLICIES))
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert (decision["tenant"], decision["route"]) == ("eurobank", "llama-70b-eu"), decision


def test_eval_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps({"request": {"methd": "GET"}}))
    result = run("eval", str(POLICIES), "--input", str(path))
    assert result.returncode == 2, result.stderr
    assert f"invalid input {path}:1:14: request.methd: Extra inputs are not permitted" in result.stderr
    path.write_text("request:\n  path: [\n")
    result = run("eval", str(POLICIES), "--input", str(path))
    assert result.returncode == 2 and f"invalid input {path}:3:1: YAML syntax error" in result.stderr
    result = run("eval", str(POLICIES), stdin="time: yesterday\n")
    assert result.returncode == 2 and "invalid input <stdin>:1:7: time:" in result.stderr, result.stderr


def test_schema_is_json_schema_of_every_kind() -> None:
    result = run("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    text = json.dumps(schema)
    for kind in (
        "AccessPolicy",
        "ModerationPolicy",
        "RoutingPolicy",
        "QuotaPolicy",
        "CanaryPolicy",
        "TenantSet",
    ):
        assert kind in text
    assert schema["$schema"].startswith("https://json-schema.org/")


def test_hash_key_output_is_accepted_by_the_loader(tmp_path: Path) -> None:
    result = run("hash-key", "--id", "k1", stdin="sk-test-a-long-secret-key\n")
    assert result.returncode == 0
    entry = result.stdout
    assert "sk-test-a-long-secret-key" not in entry
    (tmp_path / "t.yaml").write_text(
        "apiVersion: policy-engine/v1\nkind: TenantSet\nmetadata: {name: t}\n"
        "spec:\n  tenants:\n    - id: t1\n      api_keys:\n"
        + "".join(f"        {line}\n" for line in entry.splitlines())
    )
    (tmp_path / "a.yaml").write_text(
        "apiVersion: policy-engine/v1\nkind: AccessPolicy\nmetadata: {name: a}\n"
        "spec: {rules: [{name: all, effect: allow, when: 'true'}]}\n"
    )
    from policy_engine.policy.compiler import load_bundle

    bundle = load_bundle(tmp_path)
    tenant = bundle.tenants.resolve({"authorization": "Bearer sk-test-a-long-secret-key"}, "")
    assert tenant.id == "t1" and tenant.key_id == "k1"
    assert bundle.tenants.resolve({"authorization": "Bearer sk-test-a-long-secret-kez"}, "").id == ""


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("check", "test", "eval", "schema", "hash-key"):
        assert command in result.stdout


def test_reference_doc_is_up_to_date() -> None:
    result = run("reference")
    assert result.returncode == 0
    committed = (ROOT / "docs" / "policy-language.md").read_text()
    assert result.stdout == committed, "regenerate: policy-engine reference > docs/policy-language.md"
    for name in (
        "pii.card",
        "terms.any",
        "injection.detected",
        "net.in_cidr",
        "semver.compare",
        "globs.match",
    ):
        assert f"`{name}`" in committed


def test_serve_rejects_a_bad_backends_file(tmp_path: Path) -> None:
    bad = tmp_path / "backends.yaml"
    bad.write_text("backends:\n  - {name: a, capacity: -1, colour: blue}\n")
    result = run("serve", "--policies", str(POLICIES), "--backends-file", str(bad), "--port", "0")
    assert result.returncode == 2
    assert "invalid backends" in result.stderr and "capacity" in result.stderr and "colour" in result.stderr


def test_serve_rejects_a_broken_policy_directory(policy_copy: Path) -> None:
    (policy_copy / "access.yaml").write_text("apiVersion: policy-engine/v1\nkind: AccessPolicy\n")
    result = run("serve", "--policies", str(policy_copy), "--port", "0", "--metrics-port", "0")
    assert result.returncode == 1 and "access.yaml" in result.stderr


def test_envoy_config_warns_of_native_readers_with_rate_limit_charging() -> None:
    warned = run("envoy-config", "--usage-extraction", "native", "--charging", "rate-limit")
    assert warned.returncode == 0, warned.stderr
    assert "warning: with --usage-extraction native, --charging rate-limit" in warned.stderr
    assert "json_to_metadata" in warned.stdout
    for arguments in (["--usage-extraction", "native"], ["--charging", "rate-limit"]):
        quiet = run("envoy-config", "--backend", "a=127.0.0.1:8000", *arguments)
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, arguments


def test_the_mesh_envoy_filter_takes_the_gateways_charging_and_usage_choices() -> None:
    import yaml

    from policy_engine.envoy.bootstrap import GatewayConfig
    from policy_engine.mesh.envoyfilter import MeshTarget, envoy_filter

    printed = run("mesh-config", "envoyfilter", "--charging", "rate-limit", "--usage-extraction", "native")
    assert printed.returncode == 0, printed.stderr
    expected = envoy_filter(MeshTarget(), GatewayConfig(charging="rate_limit", usage_extraction="native"))
    assert yaml.safe_load(printed.stdout) == expected
    assert "warning: with --usage-extraction native, --charging rate-limit" in printed.stderr
    default = run("mesh-config", "envoyfilter")
    assert default.returncode == 0 and "warning" not in default.stderr
    assert yaml.safe_load(default.stdout) == envoy_filter(MeshTarget())
    assert "envoy.filters.http.set_metadata" in default.stdout
    assert "envoy.filters.http.ratelimit" not in default.stdout
    refused = run("mesh-config", "envoyfilter", "--charging", "per-request")
    assert refused.returncode == 2 and "access-log" in refused.stderr


def test_envoy_config_refuses_a_backend_given_twice_and_warns_of_none() -> None:
    twice = run("envoy-config", "--backend", "a=127.0.0.1:1", "--backend", "a=127.0.0.1:2")
    assert twice.returncode == 2 and "--backend a is given twice" in twice.stderr and not twice.stdout
    none = run("envoy-config")
    assert (
        none.returncode == 0 and "warning: no --backend" in none.stderr and "static_resources" in none.stdout
    )


def test_envoy_config_refuses_what_envoy_would_reject() -> None:
    for arguments, message in (
        (["--backend", "a=h:99999"], "port from 1 to 65535"),
        (["--policy", "h:0"], "port from 1 to 65535"),
        (["--listen-port", "70000"], "--listen-port"),
        (["--authz-timeout", "-1"], "--authz-timeout"),
    ):
        result = run("envoy-config", *arguments)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)


def test_mesh_validate_never_falls_back_from_a_named_crd_file() -> None:
    result = subprocess.run(
        [*CLI, "mesh-config", "validate", "mesh/gateway.yaml"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={**os.environ, "PE_ISTIO_CRDS": "/nonexistent/crd-all.gen.yaml"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "/nonexistent/crd-all.gen.yaml, which is not a file" in result.stderr
    assert "valid" not in result.stdout


def test_serve_names_a_bad_setting_as_the_user_gave_it() -> None:
    flag = run("serve", "--decision-log-sample", "2")
    assert flag.returncode == 2
    assert "invalid settings: --decision-log-sample / PE_DECISION_LOG_SAMPLE: Input should be" in flag.stderr
    variable = subprocess.run(
        [*CLI, "serve"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={**os.environ, "PE_GRACE_S": "-1"},
    )  # fmt: skip
    assert variable.returncode == 2 and "invalid settings: PE_GRACE_S: Input should be" in variable.stderr


def test_serve_warns_of_a_misspelled_setting_in_the_environment() -> None:
    """A PE_* variable no setting reads would otherwise be ignored without a word."""
    result = subprocess.run(
        [*CLI, "serve", "--policies", "/nonexistent-policies"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={**os.environ, "PE_DECISON_LOG": "-", "PE_GRACE_S": "3"},
    )  # fmt: skip
    warning = "warning: no setting reads PE_DECISON_LOG; it is ignored (did you mean PE_DECISION_LOG?)"
    assert warning in result.stderr
    assert "PE_GRACE_S" not in result.stderr  # a setting read from the environment only


def test_serve_rejects_a_redis_url_the_store_cannot_use_without_showing_its_password() -> None:
    for args, reason in [
        (["--redis-url", "redis://user:s3cret@127.0.0.1:1/0?foo=1"], "not supported by the quota store: foo"),
        (["--redis-url", "redis://user:s3cret@127.0.0.1:1/3", "--redis-cluster"], "only database 0"),
        (["--redis-cluster"], "--redis-cluster needs --redis-url"),
    ]:
        result = run("serve", "--policies", str(POLICIES), "--port", "0", "--metrics-port", "0", *args)
        assert result.returncode == 2, result.stderr
        assert reason in result.stderr
        assert "s3cret" not in result.stderr + result.stdout


def test_canary_commands_need_a_redis_url_for_a_cluster() -> None:
    result = run("canary", "status", "--redis-cluster")
    assert result.returncode == 1
    assert "--redis-cluster needs --redis-url" in result.stderr


def test_serve_rejects_a_sentinel_url_it_cannot_use() -> None:
    for args, reason in [
        (["--redis-url", "redis+sentinel://:s3cret@s1/quotas/x"], "is a number"),
        (["--redis-url", "redis+sentinel://:s3cret@s1/quotas", "--redis-cluster"], "not a redis+sentinel"),
    ]:
        result = run("serve", "--policies", str(POLICIES), "--port", "0", "--metrics-port", "0", *args)
        assert result.returncode == 2, result.stderr
        assert reason in result.stderr
        assert "s3cret" not in result.stderr + result.stdout
