"""The controller over a real telemetry hub and the policies' CEL analysis; the canary CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from policy_engine.canary.controller import CanaryController
from policy_engine.canary.local import LocalExecutor
from policy_engine.canary.state import RolloutState
from policy_engine.canary.store import FileStore, StoreError
from policy_engine.canary.telemetry import HubSource
from policy_engine.cli import app
from policy_engine.policy.compiler import load_bundle
from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.observations import RequestObservation

POLICIES = Path(__file__).resolve().parents[1] / "e2e" / "canary_policies"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def traffic(hub: TelemetryHub, canary_status: int, n: int = 10) -> None:
    for _ in range(n):
        hub.observe(RequestObservation("v2", canary_status, latency_ms=5.0))
        hub.observe(RequestObservation("v1", 200, latency_ms=5.0))


def run_controller(tmp_path: Path, canary_status: int) -> tuple[list[int], str, LocalExecutor]:
    bundle = load_bundle(POLICIES)
    hub = TelemetryHub(["v1", "v2"])
    clock, executor = Clock(), LocalExecutor()
    store = FileStore(tmp_path / "state.json")
    controller = CanaryController(lambda: bundle, HubSource(hub), store, executor, clock=clock)
    weights = []

    async def ticks() -> str:
        state = None
        for _ in range(6):
            state = (await controller.tick())["c"]
            weights.append(executor.weights()["c"])
            traffic(hub, canary_status)
            clock.now += 2.0
        assert state is not None
        return state.phase

    return weights, asyncio.run(ticks()), executor


def test_healthy_traffic_promotes_through_the_steps(tmp_path: Path) -> None:
    weights, phase, _ = run_controller(tmp_path, 200)
    assert weights[:4] == [20, 50, 100, 100] and phase == "promoted"


def test_failing_canary_is_rolled_back_at_the_first_analysis(tmp_path: Path) -> None:
    weights, phase, _ = run_controller(tmp_path, 503)
    assert weights[:2] == [20, 0] and phase == "rolled_back"
    stored = asyncio.run(FileStore(tmp_path / "state.json").load("c"))
    assert stored is not None and "canary v2: error_rate=1.0000" in stored.last_analysis


def test_cli_status_promote_abort(tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "state.json"
    empty = runner.invoke(app, ["canary", "status", "--state", str(state)])
    assert empty.exit_code == 0 and "no rollouts" in empty.output
    missing = runner.invoke(app, ["canary", "promote", "c", "--state", str(state)])
    assert missing.exit_code == 1 and "no rollout named 'c'" in missing.output
    run_controller(tmp_path, 200)
    table = runner.invoke(app, ["canary", "status", "--state", str(state)])
    assert table.exit_code == 0 and "promoted" in table.output
    as_json = json.loads(runner.invoke(app, ["canary", "status", "--json", "--state", str(state)]).output)
    assert as_json["c"]["weight"] == 100
    aborted = runner.invoke(app, ["canary", "abort", "c", "--state", str(state)])
    assert aborted.exit_code == 0 and "abort requested" in aborted.output
    assert asyncio.run(FileStore(state).take_command("c")) == "abort"


def test_policy_change_starts_a_new_rollout(tmp_path: Path) -> None:
    run_controller(tmp_path, 503)
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    text = (policies / "policy.yaml").read_text().replace("canary: v2", "canary: v1b")
    (policies / "policy.yaml").write_text(text)
    bundle = load_bundle(policies)
    store = FileStore(tmp_path / "state.json")
    source = HubSource(TelemetryHub(["v1", "v1b"]))
    controller = CanaryController(lambda: bundle, source, store, LocalExecutor())
    state = asyncio.run(controller.tick())["c"]
    assert (state.phase, state.weight) == ("progressing", 20)
    assert [t.reason for t in state.history].count("rollout started") == 2  # the old history is kept


class FlakyStore(FileStore):
    """The real file store, with saves that fail while `failing` (a full disk)."""

    failing = False

    async def save(self, state: RolloutState) -> None:
        if self.failing:
            raise StoreError("disk full")
        await super().save(state)


def test_a_command_survives_a_failed_save(tmp_path: Path) -> None:
    bundle = load_bundle(POLICIES)
    store, clock = FlakyStore(tmp_path / "state.json"), Clock()
    controller = CanaryController(
        lambda: bundle, HubSource(TelemetryHub(["v1", "v2"])), store, LocalExecutor(), clock=clock
    )

    async def scenario() -> RolloutState:
        await controller.tick()
        await store.request("c", "abort")  # what `policy-engine canary abort c` does
        store.failing = True
        await controller.tick()  # logged and retried next tick
        store.failing = False
        return (await controller.tick())["c"]

    state = asyncio.run(scenario())
    assert (state.phase, state.weight) == ("aborted", 0)
