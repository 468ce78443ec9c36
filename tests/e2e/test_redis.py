"""Shared counters in a real Redis server: two service replicas behind one Envoy, and outages."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policy_engine.demo.backend import BackendServer
from tests.e2e.conftest import FREE, PRO
from tests.e2e.harness import EnvoyProcess, ServiceProcess, start_envoy, start_service
from tests.redis_server import (
    RedisClusterNodes,
    RedisProcess,
    SentinelGroup,
    command,
    start_cluster,
    start_redis,
    start_sentinel_group,
)

POLICIES = Path(__file__).resolve().parent / "redis_policies"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    server = start_redis()
    yield server
    server.close()


Replicas = tuple[EnvoyProcess, list[ServiceProcess], BackendServer]


@pytest.fixture
def replicas(redis: RedisProcess) -> Iterator[Replicas]:
    yield from _replicas(redis.url)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = start_cluster(primaries=3)
    yield nodes
    nodes.close()


@pytest.fixture
def cluster_replicas(cluster: RedisClusterNodes) -> Iterator[Replicas]:
    # The URL names the last primary: most counters' slots are elsewhere.
    yield from _replicas(cluster.primaries[-1].url, cluster=True)


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    started = start_sentinel_group()
    yield started
    started.close()


@pytest.fixture
def sentinel_replicas(sentinel_group: SentinelGroup) -> Iterator[Replicas]:
    yield from _replicas(sentinel_group.url)


def _replicas(url: str, *, cluster: bool = False) -> Iterator[Replicas]:
    backend = BackendServer("model-a").start()
    services = [
        # A generous Redis timeout: a reply lost to a loaded test machine is not what is under test.
        start_service(
            POLICIES,
            backends=["model-a"],
            redis_url=url,
            extra_args=["--no-reload", *(["--redis-cluster"] if cluster else [])],
            env={"PE_REDIS_TIMEOUT_S": "2.0"},
        )
        for _ in range(2)
    ]
    from policy_engine.envoy.bootstrap import Upstream

    envoy = start_envoy(
        services[0].port,
        {"model-a": backend.port},
        policy_replicas=(Upstream("127.0.0.1", services[1].port),),
        # Likewise for the decision: on a loaded machine a burst of 200 can outlast the 1 s
        # default, and Envoy answers a timed-out check with its status_on_error, 503 (one full
        # local run got 21 of them here).
        authz_timeout_s=5.0,
    )
    yield envoy, services, backend
    envoy.stop()
    for service in services:
        service.stop()
    backend.stop()


def decisions(service: ServiceProcess) -> int:
    return sum(
        int(float(v))
        for v in re.findall(r"^pe_decisions_total\{[^}]*\} ([0-9.e+]+)$", service.metrics(), re.M)
    )


async def burst(url: str, headers: dict[str, str], count: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        responses = await asyncio.gather(
            *(client.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) for _ in range(count))
        )
    unexpected = {
        f"{r.status_code} {r.headers.get('x-pe-reason', '')} {r.text[:200]}"
        for r in responses
        if r.status_code not in (200, 429)
    }
    if unexpected:  # which part answered, for a failing assertion on the counts
        print("unexpected answers:", *sorted(unexpected), sep="\n  ")
    return Counter(r.status_code for r in responses)


@pytest.mark.parametrize("store", ["server", "cluster", "sentinel"])
def test_two_replicas_enforce_one_limit_exactly(store: str, request: pytest.FixtureRequest) -> None:
    fixture = {"server": "replicas", "cluster": "cluster_replicas", "sentinel": "sentinel_replicas"}[store]
    envoy, services, backend = request.getfixturevalue(fixture)
    # Each service read the store once before serving: connected (and, on a cluster, its slot
    # map read; through Sentinel, its primary found) before the first request.
    assert all("quota store reachable" in s.output() for s in services)
    statuses = asyncio.run(burst(envoy.url, FREE, 200))
    assert statuses == Counter({200: 50, 429: 150})
    assert backend.requests == 50
    # Both replicas decided part of the burst: the limit held across processes, not inside one.
    assert all(decisions(s) > 10 for s in services), [decisions(s) for s in services]


def test_redis_outage_follows_on_error_and_recovers(
    redis: RedisProcess, replicas: tuple[EnvoyProcess, list[ServiceProcess], BackendServer]
) -> None:
    envoy, services, _ = replicas
    url = f"{envoy.url}/v1/chat/completions"
    assert httpx.post(url, json=CHAT, headers=FREE).status_code == 200
    redis.stop()
    closed = httpx.post(url, json=CHAT, headers=FREE)
    assert closed.status_code == 503, closed.text  # strict: on_error deny
    assert closed.json()["error"]["code"] == "quota_unavailable" and closed.headers["retry-after"] == "1"
    opened = httpx.post(url, json=CHAT, headers=PRO)
    assert opened.status_code == 200  # lenient: on_error allow
    for _ in range(20):
        assert httpx.post(url, json=CHAT, headers=FREE).status_code == 503
    for service in services:
        assert service.process.poll() is None, "a service died while Redis was down"
    # Every request during the outage fails the same way: a line per service and interval, not
    # one per request (22 here).
    lines = [s.output().count("quota store unavailable") for s in services]
    assert sum(lines) >= 1 and max(lines) <= 2, lines
    assert (
        sum(
            float(v)
            for s in services
            for v in re.findall(
                r'^pe_quota_store_errors_total\{operation="admit"\} ([0-9.]+)$', s.metrics(), re.M
            )
        )
        >= 2
    )
    redis.restart()  # an empty server: persistence is off
    deadline = time.monotonic() + 15
    while (status := httpx.post(url, json=CHAT, headers=FREE).status_code) != 200:
        assert status == 503 and time.monotonic() < deadline, status  # until the clients reconnect
        time.sleep(0.1)
    statuses = asyncio.run(burst(envoy.url, FREE, 60))
    logs = "\n".join(s.output()[-3000:] for s in services)
    assert statuses == Counter({200: 49, 429: 11}), logs  # counting resumed from zero on the new server


def test_tokens_are_charged_on_a_redis_cluster(
    cluster: RedisClusterNodes, cluster_replicas: Replicas
) -> None:
    """The usage each answer reports ends up in the tenant's token counter, on the cluster node
    that owns the tenant's slot, whichever replica decided and charged."""
    envoy, _, _ = cluster_replicas
    reported = 0
    for _ in range(6):
        answer = httpx.post(f"{envoy.url}/v1/chat/completions", json=CHAT, headers=PRO, timeout=30)
        assert answer.status_code == 200, answer.text
        reported += answer.json()["usage"]["total_tokens"]
    deadline = time.monotonic() + 10

    def charged() -> dict[int, int]:
        found: dict[int, int] = {}
        for node in cluster.primaries:
            for key in command(node.port, "KEYS", "pe:{globex}:*tokens*"):  # type: ignore[attr-defined]
                found[node.port] = found.get(node.port, 0) + int(str(command(node.port, "GET", key)))
        return found

    while sum(charged().values()) != reported and time.monotonic() < deadline:
        time.sleep(0.1)  # charged after each answer, from Envoy's access log
    found = charged()
    assert sum(found.values()) == reported, (found, reported)
    assert len(found) == 1  # one node holds the tenant's counters


def test_a_store_unreachable_at_start_is_reported_and_the_service_serves() -> None:
    from tests.redis_server import free_port

    service = start_service(
        POLICIES,
        backends=["model-a"],
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        extra_args=["--no-reload"],
    )
    try:
        assert "quota store unreachable at start" in service.output()
        assert service.process.poll() is None
    finally:
        service.stop()
