"""The demo's parts that need no processes: its policy set, how answers are counted, the metrics
it reads, and its input errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from typer.testing import CliRunner

from policy_engine.cli import app
from policy_engine.demo.dashboard import Screen, parse_metrics, plain_line, render
from policy_engine.demo.outcomes import (
    ACCESS,
    ALLOWED,
    BACKEND_ERROR,
    GATEWAY_ERROR,
    MODERATION,
    NO_BACKEND,
    QUOTA,
    SHED,
    Outcome,
    Tally,
    classify,
    reason_stages,
)
from policy_engine.demo.processes import DemoError, check_port
from policy_engine.demo.runner import DEMO_POLICIES, backend_names
from policy_engine.policy.compiler import load_bundle

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"


def test_demo_policies_are_the_examples_but_for_the_canary_rollout() -> None:
    """The demo's copy may differ from policies/ only where its canary.yaml says why."""
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert sorted(p.name for p in DEMO_POLICIES.glob("*.yaml")) == names
    for name in names:
        demo, example = (DEMO_POLICIES / name).read_text(), (EXAMPLES / name).read_text()
        if name == "canary.yaml":
            demo_doc, example_doc = yaml.safe_load(demo), yaml.safe_load(example)
            for doc in (demo_doc, example_doc):
                for key in ("weight",):
                    doc["spec"].pop(key)
                for key in ("steps", "interval", "min_requests"):
                    doc["spec"]["rollout"].pop(key)
            assert demo_doc == example_doc
            assert yaml.safe_load(demo)["spec"]["rollout"]["interval"] == "10s"
        else:
            assert demo == example, name


def test_demo_backends_are_every_route_target_of_the_policies() -> None:
    names = backend_names(load_bundle(DEMO_POLICIES))
    assert "llama-70b-v2" in names and "whisper" in names and "embed-b" in names
    assert "llama-70b-v1" not in names  # a canary label, not a backend
    stable = load_bundle(DEMO_POLICIES).canary[0].stable
    assert stable in names


@pytest.fixture(scope="module")
def stages() -> dict[str, str]:
    return reason_stages(load_bundle(EXAMPLES))


@pytest.mark.parametrize(
    ("status", "headers", "kind", "reason"),
    [
        (200, {"x-backend": "llama-8b-a"}, ALLOWED, "ok"),
        (500, {"x-backend": "llama-8b-a"}, BACKEND_ERROR, "backend_500"),
        (401, {"x-pe-reason": "invalid_api_key"}, ACCESS, "invalid_api_key"),
        (403, {"x-pe-reason": "model_not_allowed"}, ACCESS, "model_not_allowed"),
        (400, {"x-pe-reason": "max_tokens_exceeded"}, ACCESS, "max_tokens_exceeded"),
        (400, {"x-pe-reason": "prompt_injection"}, MODERATION, "prompt_injection"),
        (413, {"x-pe-reason": "prompt_too_large"}, MODERATION, "prompt_too_large"),
        (429, {"x-pe-reason": "rate_limit_exceeded"}, QUOTA, "rate_limit_exceeded"),
        (429, {}, QUOTA, "rate_limit_exceeded"),
        (503, {"x-pe-reason": "overloaded"}, SHED, "overloaded"),
        (503, {"x-pe-reason": "no_backend_available"}, NO_BACKEND, "no_backend_available"),
        (503, {}, GATEWAY_ERROR, "gateway_503"),
        (403, {"x-pe-reason": "reason_from_an_edited_policy"}, ACCESS, "reason_from_an_edited_policy"),
        (400, {"x-pe-reason": "reason_from_an_edited_policy"}, MODERATION, "reason_from_an_edited_policy"),
    ],
)
def test_answers_are_classified_by_the_stage_that_produced_them(
    stages: dict[str, str], status: int, headers: dict[str, str], kind: str, reason: str
) -> None:
    outcome = classify(status, headers, stages)
    assert (outcome.kind, outcome.reason) == (kind, reason)


def test_tally_counts_the_canary_share_among_eligible_answers() -> None:
    tally = Tally()
    tally.record("globex", Outcome(ALLOWED, 200, "ok", "llama-70b-v2"), "llama-70b-v2")
    tally.record("globex", Outcome(ALLOWED, 200, "ok", "llama-70b-a100-a"), "llama-70b-v2")
    tally.record("globex", Outcome(ALLOWED, 200, "ok", "llama-70b-a100-b"), "llama-70b-v2")
    tally.record("globex", Outcome(SHED, 503, "overloaded"), "llama-70b-v2")  # not an answer of either
    tally.record("acme", Outcome(ALLOWED, 200, "ok", "llama-70b-h100-a"))  # not eligible
    tally.failed("acme")
    assert tally.canary_share() == pytest.approx(1 / 3)
    assert tally.total == 6 and tally.transport_errors == 1
    assert tally.tenants["globex"] == {ALLOWED: 3, SHED: 1}
    assert tally.backends["llama-70b-v2"] == 1


def test_metrics_page_gives_backend_health_and_canary_weight() -> None:
    registry = CollectorRegistry()
    healthy = Gauge("pe_telemetry_backend_healthy", "", ["backend"], registry=registry)
    healthy.labels("llama-8b-a").set(0)
    healthy.labels("llama-8b-b").set(1)
    Gauge("pe_telemetry_backend_queue_depth", "", ["backend"], registry=registry).labels("llama-8b-a").set(7)
    Gauge("pe_canary_weight", "", ["policy"], registry=registry).labels("llama-70b-v2").set(50)
    phase = Gauge("pe_canary_phase", "", ["policy", "phase"], registry=registry)
    phase.labels("llama-70b-v2", "progressing").set(1)
    phase.labels("llama-70b-v2", "rolled_back").set(0)
    view = parse_metrics(generate_latest(registry).decode())
    assert view.backends["llama-8b-a"].healthy == 0 and view.backends["llama-8b-a"].queue_depth == 7
    assert view.backends["llama-8b-b"].healthy == 1
    assert view.controller
    assert view.canaries["llama-70b-v2"].weight == 50
    assert view.canaries["llama-70b-v2"].phase == "progressing"
    screen = Screen(Tally(), [(1.0, "burst")], view, 3.0, 60.0, "http://127.0.0.1:8080", {"llama-70b-v2": 20})
    assert "weight 50%, phase progressing" in plain_line(screen)
    render(screen)  # builds without error


def test_without_the_controller_the_screen_says_so() -> None:
    view = parse_metrics("# no canary gauges\n")
    screen = Screen(Tally(), [], view, 1.0, 60.0, "http://127.0.0.1:8080", {"llama-70b-v2": 20})
    assert "canary controller not available: static weights from the policies (llama-70b-v2 20%)" in (
        plain_line(screen)
    )


def test_a_port_in_use_names_the_option_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DemoError, match=rf"port {port} is taken \(use --port PORT"):
            check_port("127.0.0.1", port, "--port")
    check_port("127.0.0.1", 0, "--port")  # 0: any free port, nothing to check


def test_demo_with_broken_policies_lists_the_errors_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: policy-engine/v1\nkind: AccessPolicy\nmetadata: {name: x}\n"
        "spec: {rules: [{name: r, effect: allow, when: 'llm.modle == \"a\"'}]}\n"
    )
    workdir = tmp_path / "work"
    result = CliRunner().invoke(
        app, ["demo", "--policies", str(tmp_path), "--port", "0", "--workdir", str(workdir), "--no-dashboard"]
    )
    assert result.exit_code == 1
    assert "bad.yaml" in result.output and "modle" in result.output
    assert "the demo needs valid policies" in result.output
    assert not workdir.exists()
