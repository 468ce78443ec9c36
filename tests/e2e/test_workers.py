"""--workers N: processes share the gRPC port, metrics are aggregated, SIGTERM stops them all."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx

from policy_engine.demo.backend import BackendServer
from tests.e2e.conftest import PRO, TOKEN_POLICIES
from tests.e2e.harness import ServiceProcess, start_envoy, start_service, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_workers_share_the_port(tmp_path: object) -> None:
    backend = BackendServer("model-a").start()
    backend.behaviour.completion_tokens = 1  # the pro output budget (70) must outlast the 40 requests
    # Only model-a is known: model-b, also a candidate of the route, is then skipped as stale.
    service = start_service(TOKEN_POLICIES, backends=["model-a"], workers=2, extra_args=["--no-reload"])
    envoy = start_envoy(service.port, {"model-a": backend.port})
    try:
        workers = children(service.process.pid)
        assert len(workers) >= 2, workers
        with httpx.Client() as client:
            statuses = [
                client.post(f"{envoy.url}/v1/chat/completions", json=CHAT, headers=PRO).status_code
                for _ in range(40)
            ]
        assert statuses == [200] * 40
        metrics = service.metrics()
        total = sum(
            float(v)
            for v in re.findall(
                r'^pe_decisions_total\{reason="ok",result="allow"\} ([0-9.]+)$', metrics, re.M
            )
        )
        assert total == 40, metrics

        # Each worker's telemetry, mirrored into the aggregated metrics: gauges per worker
        # process, and all 40 requests of the access log (one stream, which lands on one
        # worker; the summing over workers is tests/unit/test_metrics_multiprocess.py's).
        def telemetry_exported() -> bool:
            text = service.metrics()
            healthy = re.findall(
                r'^pe_telemetry_backend_healthy\{[^}]*backend="model-a"[^}]*\} 1\.0$', text, re.M
            )
            requests = re.findall(
                r'^pe_telemetry_backend_requests_total\{backend="model-a"\} ([0-9.]+)$', text, re.M
            )
            return len(healthy) == 2 and requests == ["40.0"]

        wait_until(telemetry_exported, 15, "the workers' telemetry in the aggregated metrics")
    finally:
        envoy.stop()
        code = service.stop()
        backend.stop()
    assert code == 0
    assert all(not _alive(p) for p in workers), "a worker outlived the service"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_taken_metrics_port_fails_before_any_worker_starts(tmp_path: object) -> None:
    import socket
    import sys

    from tests.e2e.harness import ROOT, free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        args = [
            sys.executable, "-m", "policy_engine", "serve", "--policies", str(TOKEN_POLICIES),
            "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "2",
            "--metrics-port", str(metrics_port), "--canary-state", f"{tmp_path}/canary.json",
        ]  # fmt: skip
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr, result.stderr


def worker_pids(pid: int) -> set[int]:
    """The service's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.add(child)
    return found


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (from /proc: its socket inodes
    against the kernel's table of listening sockets)."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:[") : -1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
        }
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    return True
    return False


def both_workers_listening(service: ServiceProcess) -> None:
    """Wait until both workers take connections: the health check start_service waits for
    reaches only one of them."""
    wait_until(
        lambda: [listens(pid, service.port) for pid in worker_pids(service.process.pid)] == [True, True],
        30,
        "two workers listening",
    )


def test_a_killed_worker_is_replaced_while_the_other_serves(tmp_path: object) -> None:
    import signal

    backend = BackendServer("model-a").start()
    backend.behaviour.completion_tokens = 1
    service = start_service(TOKEN_POLICIES, backends=["model-a"], workers=2, extra_args=["--no-reload"])
    envoy = start_envoy(service.port, {"model-a": backend.port})
    try:
        # Both serving before one is killed: the survivor must already take connections.
        both_workers_listening(service)
        before = worker_pids(service.process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)  # what the OOM killer does
        with httpx.Client() as client:
            statuses = [
                client.post(f"{envoy.url}/v1/chat/completions", json=CHAT, headers=PRO).status_code
                for _ in range(10)
            ]
        # Each of Envoy's two worker threads may hold a connection to the killed worker that it
        # has not yet seen close: the first request on it fails. The survivor takes the rest.
        assert statuses.count(200) >= 8, statuses

        def replaced() -> bool:
            now = worker_pids(service.process.pid)
            return len(now) == 2 and victim not in now

        wait_until(replaced, 60, "a new worker in place of the killed one")
        assert "worker 0 exited" in service.output() or "worker 1 exited" in service.output()
    finally:
        envoy.stop()
        code = service.stop()
        backend.stop()
    assert code == 0


def test_a_port_another_service_holds_is_refused(tmp_path: object) -> None:
    """gRPC binds with SO_REUSEPORT unless told otherwise: a second service on a taken port
    would have started and taken half the connections with its own policies."""
    import sys

    from tests.e2e.harness import ROOT, free_port

    first = start_service(TOKEN_POLICIES, port=free_port())
    try:
        for workers in ("1", "2"):
            args = [
                sys.executable, "-m", "policy_engine", "serve", "--policies", str(TOKEN_POLICIES),
                "--host", "127.0.0.1", "--port", str(first.port), "--workers", workers,
                "--metrics-port", "0", "--canary-state", f"{tmp_path}/canary.json",
            ]  # fmt: skip
            result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert result.returncode == 1, (workers, result.stderr)
            assert f"cannot listen on 127.0.0.1:{first.port}" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr, result.stderr
        assert listens(first.process.pid, first.port)
    finally:
        first.stop()


def test_workers_without_a_fixed_port_are_refused_as_a_setting(tmp_path: object) -> None:
    import sys

    from tests.e2e.harness import ROOT

    args = [
        sys.executable, "-m", "policy_engine", "serve", "--policies", str(TOKEN_POLICIES),
        "--port", "0", "--workers", "2", "--canary-state", f"{tmp_path}/canary.json",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--workers > 1 needs a fixed --port" in result.stderr


def test_metrics_listen_where_the_service_does(tmp_path: object) -> None:
    """--host 127.0.0.1 keeps /metrics off other interfaces too, unless PE_METRICS_HOST says otherwise."""

    def metrics_addresses(port: int) -> set[str]:
        found = set()
        with open("/proc/net/tcp", encoding="ascii") as handle:
            for line in handle.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
        return found

    service = start_service(TOKEN_POLICIES)
    try:
        assert metrics_addresses(service.metrics_port) == {"127.0.0.1"}
    finally:
        service.stop()
    service = start_service(TOKEN_POLICIES, env={"PE_METRICS_HOST": "0.0.0.0"})
    try:
        assert metrics_addresses(service.metrics_port) == {"0.0.0.0"}
    finally:
        service.stop()


def test_a_worker_replaced_while_the_policies_are_broken_serves_the_last_good_ones(tmp_path: Path) -> None:
    """A broken edit is rejected by the running workers; a worker started then (one replacing a
    crashed worker) used to fail to load, exit and be replaced, until the supervisor stopped
    the whole service. It serves the last good policies, as the others do."""
    import shutil
    import signal

    policies = tmp_path / "policies"
    shutil.copytree(TOKEN_POLICIES, policies)
    backend = BackendServer("model-a").start()
    backend.behaviour.completion_tokens = 1
    service = start_service(policies, backends=["model-a"], workers=2)
    envoy = start_envoy(service.port, {"model-a": backend.port})
    try:
        both_workers_listening(service)
        policy = policies / "policy.yaml"
        policy.write_text(policy.read_text() + "\n---\nkind: AccessPolicy\n")
        wait_until(lambda: "policy reload rejected" in service.output(), 30, "the broken edit rejected")
        before = worker_pids(service.process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        def replaced_and_listening() -> bool:
            now = worker_pids(service.process.pid)
            return len(now) == 2 and victim not in now and all(listens(pid, service.port) for pid in now)

        wait_until(replaced_and_listening, 60, "a new worker listening in place of the killed one")
        assert re.search(
            r"w\d ERROR policy_engine.reload: policies rejected, serving the last good", service.output()
        )
        assert service.process.poll() is None, service.output()
        with httpx.Client() as client:
            for _ in range(20):  # new connections spread over both workers
                answer = client.post(
                    f"{envoy.url}/v1/chat/completions", json=CHAT, headers={**PRO, "connection": "close"}
                )
                assert answer.status_code == 200, answer.text
        policy.write_text(policy.read_text().replace("\n---\nkind: AccessPolicy\n", ""))
    finally:
        envoy.stop()
        code = service.stop()
        backend.stop()
    assert code == 0


def test_an_ipv6_wildcard_host_in_grpc_form_serves_every_port() -> None:
    """`--host [::]` is how gRPC is told the IPv6 wildcard; the HTTP port, the metrics port and
    the start-up probe take it too (dual stack: reached here over 127.0.0.1)."""
    from tests.e2e.harness import free_port

    http_port = free_port()
    service = start_service(TOKEN_POLICIES, extra_args=["--host", "[::]", "--http-port", str(http_port)])
    try:
        assert httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics").status_code == 200
        for address in ("127.0.0.1", "[::1]"):
            answer = httpx.post(f"http://{address}:{http_port}/v1/chat/completions", json=CHAT)
            assert answer.status_code in (401, 403), answer.text  # decided: no key
    finally:
        service.stop()
