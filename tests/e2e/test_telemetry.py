"""Routing and shedding react to live telemetry: three simulated backends behind a real Envoy."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from policy_engine.demo.backend import BackendServer
from tests.e2e.conftest import FREE, PREMIUM, Gateway
from tests.e2e.harness import start_envoy, start_service

POLICIES = Path(__file__).resolve().parent / "telemetry_policies"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
NAMES = ["b1", "b2", "b3"]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Gateway]:
    backends = {name: BackendServer(name).start() for name in NAMES}
    for backend in backends.values():
        backend.behaviour.latency_ms = 20
    # Capacities make `telemetry.load` ((running + waiting) / capacity) meaningful.
    backends_file = tmp_path / "backends.yaml"
    backends_file.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {"name": name, "metrics_url": f"http://127.0.0.1:{b.port}/metrics", "capacity": 2}
                    for name, b in backends.items()
                ]
            }
        )
    )
    service = start_service(
        POLICIES,
        extra_args=["--backends-file", str(backends_file)],
        # A short half-life: the statistics follow a change within seconds, in both directions.
        env={"PE_SCRAPE_INTERVAL_S": "0.5", "PE_STALE_AFTER_S": "4", "PE_HALF_LIFE_S": "3"},
    )
    envoy = start_envoy(service.port, {name: b.port for name, b in backends.items()})
    gateway = Gateway(service, envoy, backends, POLICIES)
    yield gateway
    gateway.stop()


class Traffic:
    """Steady requests from a few clients; remembers which backend answered each, and when."""

    def __init__(self, url: str, headers: dict[str, str], clients: int = 4, timeout: float = 3.0) -> None:
        self.url, self.headers, self.timeout = f"{url}/v1/chat/completions", headers, timeout
        self.answers: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=CHAT, headers=self.headers)
                    backend = response.headers.get("x-backend") or response.headers.get("x-pe-reason", "-")
                    self.answers.append((time.monotonic(), response.status_code, backend))
                except httpx.TimeoutException:
                    self.answers.append((time.monotonic(), 0, "timeout"))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def since(self, start: float, until: float | None = None) -> Counter[str]:
        return Counter(b for t, _, b in list(self.answers) if t >= start and (until is None or t < until))


def test_a_slowed_backend_loses_traffic_and_wins_it_back(live: Gateway) -> None:
    with Traffic(live.url, PREMIUM) as traffic:
        time.sleep(3)
        assert set(traffic.since(0)) >= set(NAMES), traffic.since(0)  # all three serve at first
        live.backends["b2"].behaviour.latency_ms = 200  # ten times slower
        slowed = time.monotonic()
        time.sleep(10)
        window = traffic.since(time.monotonic() - 3)
        assert window["b2"] / sum(window.values()) <= 0.10, window  # ≥ 90 % go to the others
        live.backends["b2"].behaviour.latency_ms = 20
        recovered = time.monotonic()
        deadline = recovered + 45
        while True:
            time.sleep(2)
            window = traffic.since(time.monotonic() - 2)
            if window["b2"] / max(1, sum(window.values())) >= 0.2:
                break  # back to a fair share, well above what exploring alone sends it
            assert time.monotonic() < deadline, f"b2 never won traffic back: {window}"
    assert all(s == 200 for _, s, _ in traffic.answers), Counter(
        (s, b) for _, s, b in traffic.answers if s != 200
    )
    assert slowed < recovered


def test_a_backend_that_stops_answering_is_avoided_once_stale(live: Gateway) -> None:
    with Traffic(live.url, PREMIUM, timeout=1.5) as traffic:
        time.sleep(2)
        live.backends["b3"].behaviour.paused = True
        paused = time.monotonic()

        def stale() -> bool:
            metrics = live.service.metrics()
            return bool(re.search(r'^pe_telemetry_backend_stale\{backend="b3"\} 1\.0$', metrics, re.M))

        while not stale():
            assert time.monotonic() < paused + 20, "b3 never became stale"
            time.sleep(0.1)
        time.sleep(1.6)  # requests already sent to b3 before it went stale time out by now
        counted = live.backends["b3"].requests
        after = time.monotonic()
        time.sleep(4)
        assert live.backends["b3"].requests == counted, "a request was routed to the stale backend"
        served = traffic.since(after)
    assert served["timeout"] == 0 and served["b1"] + served["b2"] > 20, served


def test_free_tier_is_shed_above_the_load_threshold_premium_passes(live: Gateway) -> None:
    for backend in live.backends.values():
        backend.behaviour.capacity = 1
        backend.behaviour.latency_ms = 400
    with Traffic(live.url, PREMIUM, clients=12, timeout=20) as load:
        deadline = time.monotonic() + 15
        while True:
            free = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, headers=FREE, timeout=20)
            if free.headers.get("x-pe-reason") == "overloaded":
                break
            assert time.monotonic() < deadline, "the free tier was never shed"
            time.sleep(0.2)
        assert free.status_code == 503 and free.headers["retry-after"] == "2"
        assert free.json()["error"]["code"] == "overloaded"
        premium = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, headers=PREMIUM, timeout=20)
        assert premium.status_code == 200
    assert not [a for a in load.answers if a[2] == "overloaded"], "a premium request was shed"
    assert Counter(s for _, s, _ in load.answers)[200] > 5  # the premium load really ran
