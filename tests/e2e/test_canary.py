"""Canary rollouts end to end: a real Envoy, the service with the local executor, two backends.

The rollout (tests/e2e/canary_policies) steps 20 → 50 → 100 % every 2 s once 5 canary requests
were seen; the routing policy sends requests assigned to the canary to v2, the others to v1.
Traffic is bounded, to 127.0.0.1 only, and every wait polls a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from policy_engine.canary.state import RolloutState
from policy_engine.canary.store import FileStore
from policy_engine.cel.library import stable_bucket
from policy_engine.demo.backend import BackendServer
from tests.e2e.harness import (
    EnvoyProcess,
    ServiceProcess,
    free_port,
    start_envoy,
    start_service,
    wait_until,
)

POLICIES = Path(__file__).resolve().parent / "canary_policies"
FREE = {"authorization": "Bearer sk-hobby-free-key-0003"}
USERS = [f"user-{i}" for i in range(40)]
MAX_REQUESTS = 6000  # bounds every traffic loop
DEADLINE_REQUESTS = "the rollout did not reach {what} within {n} requests"


@dataclass
class Rollout:
    backends: dict[str, BackendServer]
    state_file: Path
    policies: Path
    port: int
    service: ServiceProcess
    envoy: EnvoyProcess

    def state(self) -> RolloutState | None:
        try:
            return asyncio.run(FileStore(self.state_file).load("c"))
        except Exception:
            return None

    def restart_service(self) -> None:
        self.service.stop()
        args = ["--canary-state", str(self.state_file)]
        self.service = start_service(self.policies, backends=["v1", "v2"], port=self.port, extra_args=args)

    def request(self, user: str) -> tuple[int, str]:
        body = json.dumps({"model": "m", "user": user, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            f"{self.envoy.url}/v1/chat/completions", data=body.encode(), headers=FREE, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers.get("x-backend", "")
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("x-backend", "")

    def drive(
        self, until: Callable[[RolloutState | None], bool], what: str
    ) -> list[tuple[int, str, str, int]]:
        """Requests round-robin over the users until the condition holds; each answer with the
        weight in force before and after it (equal ones only: a request during a change is ambiguous)."""
        answers: list[tuple[int, str, str, int]] = []
        for n in range(MAX_REQUESTS):
            before = self.state()
            if until(before):
                return answers
            user = USERS[n % len(USERS)]
            status, backend = self.request(user)
            after = self.state()
            if before is not None and after is not None and before.weight == after.weight:
                answers.append((status, user, backend, before.weight))
        raise AssertionError(DEADLINE_REQUESTS.format(what=what, n=MAX_REQUESTS))


@pytest.fixture
def rollout(tmp_path: Path) -> Iterator[Rollout]:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    backends = {name: BackendServer(name).start() for name in ("v1", "v2")}
    state_file = tmp_path / "canary-state.json"
    port = free_port()
    service = start_service(
        policies, backends=["v1", "v2"], port=port, extra_args=["--canary-state", str(state_file)]
    )
    envoy = start_envoy(service.port, {name: b.port for name, b in backends.items()})
    deployed = Rollout(backends, state_file, policies, port, service, envoy)
    yield deployed
    deployed.envoy.stop()
    deployed.service.stop()
    for backend in backends.values():
        backend.stop()


def assert_sticky(answers: list[tuple[int, str, str, int]]) -> None:
    seen: dict[tuple[int, str], set[str]] = defaultdict(set)
    for _, user, backend, weight in answers:
        # No backend: the service refused the request (the failing canary ejected): no version served.
        if backend:
            seen[(weight, user)].add(backend)
    flipped = {key: backends for key, backends in seen.items() if len(backends) > 1}
    assert not flipped, f"users that changed version within a step: {flipped}"


def test_a_healthy_canary_is_promoted_and_users_stay_sticky(rollout: Rollout) -> None:
    answers = rollout.drive(lambda s: s is not None and s.phase == "promoted", "promoted")
    state = rollout.state()
    assert state is not None and state.weight == 100
    assert [t.to_weight for t in state.history] == [20, 50, 100, 100]
    assert_sticky(answers)
    by_weight: dict[int, set[str]] = defaultdict(set)
    for _, _, backend, weight in answers:
        by_weight[weight].add(backend)
    assert by_weight[20] == {"v1", "v2"} and by_weight[50] == {"v1", "v2"}  # both versions served
    # Users in the canary at 20 % are still there at 50 % (the buckets only grow).
    at20 = {u for _, u, b, w in answers if w == 20 and b == "v2"}
    at50 = {u for _, u, b, w in answers if w == 50 and b == "v2"}
    assert at20 and at20 <= at50
    assert all(status == 200 for status, *_ in answers)
    metrics = rollout.service.metrics()
    assert 'pe_canary_weight{policy="c"} 100.0' in metrics
    assert 'pe_canary_phase{phase="promoted",policy="c"} 1.0' in metrics
    assert '"to_phase": "promoted"' in rollout.service.output()  # the transition was logged


def test_a_failing_canary_is_rolled_back_and_traffic_returns_to_stable(rollout: Rollout) -> None:
    rollout.backends["v2"].configure({"error_rate": 0.6})
    answers = rollout.drive(lambda s: s is not None and s.phase == "rolled_back", "rolled_back")
    state = rollout.state()
    assert state is not None and state.weight == 0
    # Rolled back at the first step, by the first analysis that had enough canary traffic.
    assert [(t.to_phase, t.to_weight) for t in state.history] == [("progressing", 20), ("rolled_back", 0)]
    assert state.history[-1].reason == "analysis failed" and "error_rate" in state.history[-1].analysis
    assert any(backend == "v2" and status == 500 for status, _, backend, _ in answers)
    assert_sticky(answers)
    after = [rollout.request(user)[1] for user in USERS]
    assert after == ["v1"] * len(USERS)


def test_a_restarted_service_resumes_at_the_same_step(rollout: Rollout) -> None:
    rollout.drive(lambda s: s is not None and s.step == 1, "the second step")
    before = rollout.state()
    assert before is not None and (before.step, before.weight, before.phase) == (1, 50, "progressing")
    rollout.restart_service()
    resumed = rollout.state()
    assert resumed is not None and resumed.step >= 1
    assert [t.reason for t in resumed.history].count("rollout started") == 1  # not started again
    # The restarted service applies the stored weight (50 %, or more once it moves on) from its
    # first decisions on: a user whose bucket lies between 20 and 50 % gets the canary.
    probes = (f"probe-{i}" for i in range(1000))
    between = next(u for u in probes if 2000 <= stable_bucket(f"c:{u}", 10_000) < 5000)
    wait_until(lambda: rollout.request(between)[0] == 200, 30, "the gateway after the restart")
    assert rollout.request(between) == (200, "v2")
    rollout.drive(lambda s: s is not None and s.phase == "promoted", "promoted after restart")
    final = rollout.state()
    assert final is not None
    weights = [t.to_weight for t in final.history]
    # Never back to the first step; an outage without traffic may show as an explicit inconclusive
    # interval at 50 % (a loaded machine can take several intervals to restart the service).
    assert weights[:2] == [20, 50] and weights[-2:] == [100, 100], final.history
    assert set(weights[2:-2]) <= {50}, final.history
