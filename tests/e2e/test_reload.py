"""Policy changes during traffic: a good change applies with no failed request, a bad one changes nothing."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.e2e.conftest import PRO, TOKEN_POLICIES, Gateway
from tests.e2e.harness import start_service, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bundle_version(gateway: Gateway) -> str:
    match = re.search(r'^pe_bundle_info\{version="([0-9a-f]+)"\} 1\.0$', gateway.service.metrics(), re.M)
    assert match, gateway.service.metrics()
    return match.group(1)


def wait_for(predicate: object, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_policy_change_during_traffic(reload_gateway: Gateway) -> None:
    url = f"{reload_gateway.url}/v1/chat/completions"
    statuses: Counter[int] = Counter()
    backends_seen: Counter[str] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                response = client.post(url, json=CHAT, headers=PRO)
                statuses[response.status_code] += 1
                backends_seen[response.headers.get("x-backend", "-")] += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.5)
        first = bundle_version(reload_gateway)
        assert statuses and set(statuses) == {200}
        policy = reload_gateway.policies / "policy.yaml"
        # A good change: route everything to model-b.
        policy.write_text(
            policy.read_text().replace("candidates: [model-a, model-b]", "candidates: [model-b]")
        )
        wait_for(lambda: bundle_version(reload_gateway) != first, "the new bundle was not loaded")
        second = bundle_version(reload_gateway)
        before = backends_seen["model-b"]
        wait_for(lambda: backends_seen["model-b"] > before + 5, "traffic did not move to model-b")
        moved_a = backends_seen["model-a"]
        time.sleep(0.3)
        assert backends_seen["model-a"] == moved_a, "model-a still gets traffic after the change"
        # A broken edit: nothing changes, and the error is reported with its position.
        policy.write_text(policy.read_text().replace("tenant.authenticated", "tenant.authenticatd"))
        wait_for(
            lambda: "tenant.authenticatd" in reload_gateway.service.output(), "the bad edit was not reported"
        )
        time.sleep(0.3)
        assert bundle_version(reload_gateway) == second
        assert re.search(r'pe_policy_reloads_total\{result="error"\} [1-9]', reload_gateway.service.metrics())
        before = backends_seen["model-b"]
        wait_for(lambda: backends_seen["model-b"] > before + 5, "traffic stopped after the bad edit")
    finally:
        stop.set()
        worker.join(15)
    assert set(statuses) == {200}, statuses  # not a single failed request
    log = reload_gateway.service.output()
    assert re.search(r"policy\.yaml:\d+:\d+: access/known: undefined field 'authenticatd'", log), log


def test_routes_to_backends_the_service_was_not_given_are_reported(tmp_path: Path) -> None:
    """A backend the service was not given counts as stale, so a route that needs it answers 503:
    the log says which, at start and after a reload that names another."""
    policies = tmp_path / "policies"
    shutil.copytree(TOKEN_POLICIES, policies)
    service = start_service(policies, backends=["model-a"])
    try:
        wait_until(lambda: "backends this service was not given" in service.output(), 20, "the warning")
        (line,) = [x for x in service.output().splitlines() if "backends this service was not given" in x]
        assert "model-b;" in line and "model-a" not in line
        policy = policies / "policy.yaml"
        policy.write_text(policy.read_text().replace("[model-a, model-b]", "[model-a, model-z]"))
        wait_until(lambda: "model-z;" in service.output(), 20, "the warning after the reload")
    finally:
        service.stop()
