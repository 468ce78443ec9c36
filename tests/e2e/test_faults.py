"""Faults end to end through a real Envoy: the service restarted under load, a backend dying, the
policy directory replaced by garbage. (Redis killed and restarted: tests/e2e/test_redis.py.)

Each test runs bounded traffic from a thread and asserts the outcome the configuration promises:
Envoy answers 503 (its ext_authz `status_on_error`) while no service answers, nothing else fails,
and traffic recovers by itself.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import PRO, Gateway, copied_gateway
from tests.e2e.harness import start_service, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MAX_TRAFFIC_S = 90.0  # the traffic thread stops by itself even if a test forgets to


@dataclass
class Traffic:
    """Requests sent one after another; outcomes in order, as (status, backend)."""

    url: str
    outcomes: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Traffic:
        def run() -> None:
            deadline = time.monotonic() + MAX_TRAFFIC_S
            with httpx.Client(timeout=10) as client:
                while not self.stop.is_set() and time.monotonic() < deadline:
                    try:
                        response = client.post(self.url, json=CHAT, headers=PRO)
                        self.outcomes.append((response.status_code, response.headers.get("x-backend", "")))
                    except httpx.TransportError:
                        self.outcomes.append((0, ""))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> Counter[int]:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)
        return Counter(status for status, _ in self.outcomes)

    def wait_for(self, count: int, what: str) -> None:
        start = len(self.outcomes)
        wait_until(lambda: len(self.outcomes) >= start + count, 30, what)

    def served_since(self, index: int) -> list[tuple[int, str]]:
        return self.outcomes[index:]


@pytest.fixture
def faulty_gateway(tmp_path: object) -> Iterator[Gateway]:
    """Two passive backends, no quotas: traffic may run as long as a test needs."""
    yield from copied_gateway(tmp_path, without_quotas=True)  # type: ignore[arg-type]


def test_service_restarted_under_load(faulty_gateway: Gateway, record_property: object) -> None:
    traffic = Traffic(f"{faulty_gateway.url}/v1/chat/completions").start()
    try:
        traffic.wait_for(20, "traffic before the restart")
        port = faulty_gateway.service.port
        faulty_gateway.service.stop()  # SIGTERM: drains, then the port is closed
        outage_start = len(traffic.outcomes)
        traffic.wait_for(5, "traffic while the service is down")
        faulty_gateway.service = start_service(
            faulty_gateway.policies, backends=list(faulty_gateway.backends), port=port
        )
        restarted = len(traffic.outcomes)
        wait_until(
            lambda: sum(s == 200 for s, _ in traffic.served_since(restarted)) >= 20,
            30,
            "traffic did not recover after the restart",
        )
    finally:
        statuses = traffic.finish()
    failed = sum(n for status, n in statuses.items() if status != 200)
    record_property("failed_requests", failed)  # type: ignore[operator]
    print(f"service restart under load: {dict(statuses)}, failed {failed} of {sum(statuses.values())}")
    assert set(statuses) <= {200, 503}, statuses
    # While no service answers, Envoy itself says 503 (no backend was asked); the new service
    # may already answer before start_service() has seen it healthy.
    down = [o for o in traffic.outcomes[outage_start:restarted] if o[0] != 200]
    assert down and all(backend == "" for _, backend in down), down
    stats = faulty_gateway.envoy.stats()
    assert stats.get("http.gateway.ext_authz.error", 0) >= statuses[503] > 0, stats


def test_a_dying_backend_is_routed_around(faulty_gateway: Gateway) -> None:
    traffic = Traffic(f"{faulty_gateway.url}/v1/chat/completions").start()
    try:
        wait_until(
            lambda: {b for _, b in traffic.outcomes} >= {"model-a", "model-b"},
            30,
            "both backends serving",
        )
        faulty_gateway.backends["model-a"].stop()  # the listener closes: connections are refused
        died = len(traffic.outcomes)

        def survivor_serves_alone() -> bool:
            recent = traffic.served_since(died)[-20:]
            return len(recent) == 20 and all(o == (200, "model-b") for o in recent)

        wait_until(survivor_serves_alone, 30, "traffic did not move to the surviving backend")
        moved = len(traffic.outcomes)
        traffic.wait_for(50, "traffic after the move")
    finally:
        statuses = traffic.finish()
    print(f"backend dying under load: {dict(statuses)} (503s until the access log reported the failures)")
    assert set(statuses) <= {200, 503}, statuses
    assert all(o == (200, "model-b") for o in traffic.served_since(moved)), traffic.served_since(moved)


def bundle_version(gateway: Gateway) -> str:
    match = re.search(r'^pe_bundle_info\{version="([0-9a-f]+)"\} 1\.0$', gateway.service.metrics(), re.M)
    assert match, gateway.service.metrics()
    return match.group(1)


def reloads(gateway: Gateway, result: str) -> float:
    match = re.search(
        rf'^pe_policy_reloads_total\{{result="{result}"\}} (\S+)$', gateway.service.metrics(), re.M
    )
    return float(match.group(1)) if match else 0.0


def test_policy_directory_replaced_by_garbage(faulty_gateway: Gateway, tmp_path: object) -> None:
    directory = faulty_gateway.policies
    saved = Path(shutil.copytree(directory, f"{tmp_path}/saved"))
    version = bundle_version(faulty_gateway)
    errors_before = reloads(faulty_gateway, "error")
    traffic = Traffic(f"{faulty_gateway.url}/v1/chat/completions").start()
    try:
        traffic.wait_for(10, "traffic before the garbage")
        for path in directory.iterdir():
            path.unlink()
        (directory / "policy.yaml").write_bytes(b"\x00\xff garbage: [unclosed\n\tkind: ???\n")
        (directory / "more.yaml").write_text("apiVersion: policy-engine/v1\nkind: Nonsense\n")
        wait_until(lambda: reloads(faulty_gateway, "error") > errors_before, 30, "the garbage was not seen")
        garbage_seen = len(traffic.outcomes)
        traffic.wait_for(20, "traffic after the garbage")
        assert bundle_version(faulty_gateway) == version, "the last good bundle must stay active"
        assert all(status == 200 for status, _ in traffic.served_since(garbage_seen))
        log = faulty_gateway.service.output()
        assert re.search(r"policy\.yaml:\d+:\d+", log), log[-2000:]
        ok_before = reloads(faulty_gateway, "ok")
        for path in directory.iterdir():
            path.unlink()
        for path in saved.iterdir():
            shutil.copy(path, directory / path.name)
        wait_until(
            lambda: reloads(faulty_gateway, "ok") > ok_before, 30, "the restored policies were not loaded"
        )
    finally:
        statuses = traffic.finish()
    assert set(statuses) == {200}, statuses
    assert bundle_version(faulty_gateway) == version
