"""`policy-engine audit` and `policy-engine explain` on decision logs written by the real log code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from policy_engine.audit.decision_log import DecisionLog, LogSink, Timing
from policy_engine.audit.explain import evaluate, explain, split_condition
from policy_engine.cli import app
from policy_engine.decide.attributes import RequestAttributes, llm_request, parse_body
from policy_engine.decide.pipeline import Pipeline
from policy_engine.policy.bundle import Bundle
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot
from tests.conftest import POLICIES

runner = CliRunner()
FREE_KEY = "sk-hobby-free-key-0003"
PRO_KEY = "sk-globex-pro-key-0002"
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
HOUR = 3600 * 10**9


def _chat(key: str, model: str, request_id: str) -> RequestAttributes:
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]}
    return RequestAttributes(
        method="POST",
        path="/v1/chat/completions",
        host="ai.example.com",
        id=request_id,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        body=json.dumps(body).encode(),
    )


@pytest.fixture(scope="module")
def decision_log(example_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "decisions.jsonl"
    log = DecisionLog(LogSink(str(path)))
    requests = [
        (_chat(PRO_KEY, "llama-3-8b-instruct", "r-allowed"), T0),
        (_chat(FREE_KEY, "llama-3-70b", "r-not-in-plan"), T0 + HOUR),
        (_chat("sk-unknown-key-000000", "llama-3-8b-instruct", "r-bad-key"), T0 + 2 * HOUR),
    ]
    tenants = example_pipeline.bundle.tenants
    snapshot = TelemetrySnapshot(
        {name: BackendStats(name, queue_depth=1) for name in ("llama-8b-a", "llama-8b-b")}
    )
    for attrs, start in requests:
        decision = example_pipeline.decide(attrs, snapshot)
        body = parse_body(attrs)
        tenant = tenants.resolve(attrs.headers, "")
        log.write(
            log.line(
                attrs,
                body,
                llm_request(attrs, body),
                decision,
                snapshot,
                Timing(start, 0.001, 0.0005),
                ("", ""),
                tenants.key_headers,
                (tenant.credential, tenant.key_id),
            )
        )
    log.close()
    with path.open("a") as extra:
        extra.write('worker 0 started\n{"type": "other"}\n')  # stdout noise is skipped, not fatal
    return path


def _ids(output: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in output.splitlines() if line.startswith("{")]


def test_audit_lists_every_decision_and_reports_skipped_lines(decision_log: Path) -> None:
    result = runner.invoke(app, ["audit", str(decision_log), "--json"])
    assert result.exit_code == 0, result.output
    assert _ids(result.stdout) == ["r-allowed", "r-not-in-plan", "r-bad-key"]
    assert "skipped 2 line(s)" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--decision", "deny"], ["r-not-in-plan", "r-bad-key"]),
        (["--tenant", "hobbyist"], ["r-not-in-plan"]),
        (["--rule", "api-access/model-not-in-plan"], ["r-not-in-plan"]),
        (["--rule", "api-access"], ["r-allowed", "r-not-in-plan", "r-bad-key"]),
        (["--since", "2026-01-01T00:30:00Z"], ["r-not-in-plan", "r-bad-key"]),
        (["--until", "2026-01-01T01:30:00+00:00"], ["r-allowed", "r-not-in-plan"]),
        (["--since", "-10m"], []),
        (["--limit", "1"], ["r-bad-key"]),
    ],
)
def test_audit_filters(decision_log: Path, args: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, ["audit", str(decision_log), "--json", *args])
    assert result.exit_code == 0, result.output
    assert _ids(result.stdout) == expected


def test_audit_table(decision_log: Path) -> None:
    result = runner.invoke(app, ["audit", str(decision_log), "--decision", "deny"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "2 decision(s)" in result.stdout and "model_not_allowed" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "not a time: 'yesterday'"),
        (["--decision", "maybe"], "--decision must be allow or deny"),
    ],
)
def test_audit_bad_input_is_a_clear_error(decision_log: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["audit", str(decision_log), *args])
    assert result.exit_code == 2 and message in result.stderr


def test_audit_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_explain_shows_the_values_of_each_part_of_the_condition(decision_log: Path) -> None:
    result = runner.invoke(
        app, ["explain", str(decision_log), "r-not-in-plan", "--policies", str(POLICIES), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["replayed"]["decision"] == data["logged"]["decision"] == "deny"
    assert data["warnings"] == []
    fired = {f["rule"]: f for f in data["fired"]}
    condition = fired["api-access/model-not-in-plan"]["conditions"][0]
    assert condition["value"] is True and condition["operator"] == "&&"
    parts = {p["expr"]: p["value"] for p in condition["parts"]}
    assert parts == {
        "tenant.authenticated": True,
        'llm.model != ""': True,
        "!globs.match(tenant.models, llm.model)": True,
    }


def test_explain_text_output(decision_log: Path) -> None:
    result = runner.invoke(app, ["explain", str(decision_log), "r-allowed", "--policies", str(POLICIES)])
    assert result.exit_code == 0, result.output
    assert "api-access/known-tenant (allow)" in result.stdout
    assert "tenant.authenticated  =>  true" in result.stdout


def test_explain_replays_an_invalid_key_without_the_key(decision_log: Path, example_bundle: Bundle) -> None:
    record = next(json.loads(line) for line in decision_log.read_text().splitlines() if '"r-bad-key"' in line)
    explanation = explain(record, example_bundle)
    assert explanation.replayed.reason == "invalid_api_key" and not explanation.warnings


def test_explain_warns_when_the_bundle_changed(decision_log: Path, policy_copy: Path) -> None:
    access = policy_copy / "access.yaml"
    access.write_text(access.read_text().replace("The free tier allows", "Free plans allow"))
    result = runner.invoke(
        app, ["explain", str(decision_log), "r-not-in-plan", "--policies", str(policy_copy)]
    )
    assert result.exit_code == 0
    assert "the request was decided by bundle" in result.stderr


def test_explain_unknown_request(decision_log: Path) -> None:
    result = runner.invoke(app, ["explain", str(decision_log), "nope", "--policies", str(POLICIES)])
    assert result.exit_code == 1 and "'nope' is not in" in result.stderr


@pytest.mark.parametrize(
    ("source", "tree"),
    [
        ("a && b || c", ("||", [("&&", ["a", "b"]), "c"])),
        ("(a || b) && c", ("&&", [("||", ["a", "b"]), "c"])),
        ('s == "x && y" && t', ("&&", ['s == "x && y"', "t"])),
        ("r'\\' == s || t", ("||", ["r'\\' == s", "t"])),
        ("f(a && b) && [x || y][0]", ("&&", ["f(a && b)", "[x || y][0]"])),
        ("a ? b && c : d", "a ? b && c : d"),
        ("(a) && (b)", ("&&", ["(a)", "(b)"])),
        ("((a || b))", ("||", ["a", "b"])),
        ("a && // why\n b", ("&&", ["a", "// why\n b"])),
    ],
)
def test_split_condition(source: str, tree: object) -> None:
    def shape(part: object) -> object:
        assert hasattr(part, "children")
        if not part.children:
            return part.text
        return (part.operator, [shape(c) for c in part.children])

    assert shape(split_condition(source)) == tree


def test_evaluate_shows_errors_per_part(example_bundle: Bundle) -> None:
    activation = example_bundle.env.activation({"request": None})
    part = evaluate(split_condition('request.headers["x"] == "1" || true'), example_bundle.env, activation)
    assert part.children[0].error and part.children[1].value is True
