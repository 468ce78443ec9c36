"""The container image: the project's Dockerfile built and run the way the Helm chart runs it
(user 65532, read-only root filesystem, every capability dropped, a writable state directory).

Built and run with podman, which builds a Dockerfile as `docker build` does and needs no engine
(there is none on the test machines). Stand-in, said here as the project's rule asks: no
container registry is reachable from the test machines, so the Dockerfile's base,
`debian:bookworm-slim`, is made here with debootstrap from Debian's mirror (a minimal bookworm,
the same release and packages as the registry's image) and tagged with that name; nothing is
pulled. The build itself installs the project from PyPI as a user's build does.

Needs `podman`, `runc` and `debootstrap` (scripts/setup installs them on Debian); a machine
without them fails here with what to install. The image is built once per session (about a
minute, plus half a minute for the base when it is not there yet).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import POLICIES, ROOT

BASE = "localhost/policy-engine-tests/bookworm-minbase:latest"
BASE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Per test run: runs of other checkouts on the same machine build their own.
IMAGE = f"localhost/policy-engine-tests/policy-engine:{os.getpid()}"
BUILD_TIMEOUT_S = 900
START_TIMEOUT_S = 60
# The first test also waits for the build (a minute here, more on a loaded machine).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
CHAT = {"model": "llama-3-8b-instruct", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result


def _free_ports(count: int) -> list[int]:
    """Ports free at once (all held until each is known, so that they differ)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the image tests need {', '.join(missing)}: run scripts/setup as root on Debian "
            "(apt-get install podman runc debootstrap)",
            pytrace=False,
        )
    # runc, and limits no higher than this process's own: the runtime cannot raise them where
    # the container runs without CAP_SYS_RESOURCE (as on the test machines).
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return Podman({**os.environ, "CONTAINERS_CONF": str(conf)})


@pytest.fixture(scope="session")
def image(podman: Podman) -> Iterator[str]:
    if podman("image", "exists", BASE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory(prefix="pe-bookworm-") as rootfs:
            made = subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian"],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            assert made.returncode == 0, f"debootstrap failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}"
            archive = Path(rootfs).with_suffix(".tar")
            try:
                subprocess.run(
                    ["tar", "-C", rootfs, "-cf", str(archive), "."], check=True, timeout=BUILD_TIMEOUT_S
                )
                podman("import", "--change", f"ENV {BASE_PATH}", str(archive), BASE, timeout=BUILD_TIMEOUT_S)
            finally:
                archive.unlink(missing_ok=True)
    build = ["build", "--pull=never", "--network", "host", "--build-arg", f"BASE={BASE}", "--tag", IMAGE]
    # The machine's CA bundle, as the Dockerfile takes it (for a proxy that inspects TLS).
    bundle = ssl.get_default_verify_paths().cafile
    if bundle and Path(bundle).is_file():
        build += ["--secret", f"id=ca-bundle,src={bundle}"]
    podman(*build, str(ROOT), timeout=BUILD_TIMEOUT_S)
    yield IMAGE
    # The tag only: its layers stay cached for the next run's build.
    podman("rmi", IMAGE, check=False)


@dataclass
class Container:
    name: str
    grpc_port: int
    metrics_port: int


@pytest.fixture
def container(podman: Podman, image: str, tmp_path: Path) -> Iterator[Container]:
    """The image run as the chart runs it: its user, a read-only root filesystem with nothing
    writable but the chart's two emptyDirs (/tmp and the rollout state), no capabilities, the
    chart's command and settings, two workers, the policy directory mounted read-only."""
    writable = {"/tmp": tmp_path / "tmp", "/var/lib/policy-engine": tmp_path / "state"}
    for path in writable.values():
        path.mkdir()
    grpc_port, metrics_port = _free_ports(2)
    name = f"pe-image-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        podman(
            "run", "--detach", "--name", name,
            "--network", "host",
            "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            # :U gives the directories to the image's user, as the pod's fsGroup does.
            *[arg for target, path in writable.items() for arg in ("--volume", f"{path}:{target}:U")],
            "--volume", f"{POLICIES}:/etc/policy-engine/policies:ro",
            "--env", "PE_HOST=127.0.0.1",
            "--env", f"PE_PORT={grpc_port}",
            "--env", f"PE_METRICS_PORT={metrics_port}",
            "--env", "PE_WORKERS=2",
            "--env", "PE_GRACE_S=15",
            "--env", "PE_CANARY_STATE=/var/lib/policy-engine/canary-state.json",
            "--env", "TMPDIR=/tmp",
            # Passive backends (no metrics to scrape) for the examples' chat routes.
            "--env", "PE_BACKENDS=llama-8b-a,llama-8b-b,llama-70b-a100-a,llama-70b-a100-b,llama-70b-h100-a,"
            "llama-70b-h100-b,llama-70b-v2,llama-70b-eu",
            image,
            "serve", "--policies", "/etc/policy-engine/policies",
        )  # fmt: skip
        yield Container(name, grpc_port, metrics_port)
    finally:
        podman("rm", "--force", name, check=False)


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _check(port: int, headers: dict[str, str]) -> external_auth_pb2.CheckResponse:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/v1/chat/completions",
        host="gateway.example",
        headers={"content-type": "application/json", **headers},
        body=json.dumps(CHAT),
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            request, timeout=10
        )
        return answer


def test_the_image_runs_as_the_charts_user(podman: Podman, image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["policy-engine"] and config["Cmd"] == ["serve"]
    assert "PE_POLICIES=/etc/policy-engine/policies" in config["Env"]


def test_the_image_serves_decisions_as_the_chart_runs_it(podman: Podman, container: Container) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _serving(container.grpc_port):
        logs = podman("logs", container.name, check=False)
        assert time.monotonic() < deadline, f"not serving:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        time.sleep(0.5)

    unknown = _check(container.grpc_port, {})
    assert unknown.status.code == code_pb2.PERMISSION_DENIED and unknown.status.message == "missing_api_key"
    assert unknown.denied_response.status.code == 401
    allowed = _check(container.grpc_port, {"authorization": "Bearer sk-acme-premium-key-0001"})
    assert allowed.status.code == code_pb2.OK
    upstream = {h.header.key: h.header.value for h in allowed.ok_response.headers}
    assert upstream["x-pe-tenant"] == "acme" and upstream["x-pe-route"]

    with urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=5) as page:
        metrics = page.read().decode()
    assert "pe_decisions_total{" in metrics

    # SIGTERM, as the kubelet sends it: a graceful stop exits 0 (a kill after the 20 s, 137).
    podman("stop", "--time", "20", container.name, timeout=60)
    exit_code = podman("inspect", container.name, "--format", "{{.State.ExitCode}}").stdout.strip()
    printed = podman("logs", container.name)
    output = printed.stderr + printed.stdout
    assert exit_code == "0", output[-3000:]
    assert "draining" in output
    # Nothing it needed to write was refused by the read-only filesystem.
    assert "Permission denied" not in output and "Read-only file system" not in output, output[-3000:]


def test_the_image_alone_denies_every_request(podman: Podman, image: str) -> None:
    """Without a mounted policy directory: the examples without their TenantSet, whose keys are
    published, so even an example key is refused."""
    listed = podman("run", "--rm", "--entrypoint", "ls", image, "/etc/policy-engine/policies").stdout.split()
    assert "tenants.yaml" not in listed and not any(name.endswith("_test.yaml") for name in listed)
    assert "routing.yaml" in listed
    checked = podman("run", "--rm", image, "check", "/etc/policy-engine/policies", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    request = {
        "request": {
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": {"authorization": "Bearer sk-acme-premium-key-0001"},  # an example key
            "body": CHAT,
        },
        "telemetry": {"backends": {"llama-8b-a": {}}},
    }
    decided = subprocess.run(
        ["podman", "run", "--rm", "-i", image, "eval", "/etc/policy-engine/policies", "--json"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        env=podman.env,
        check=False,
    )
    decision = json.loads(decided.stdout)
    assert (decision["allowed"], decision["status"], decision["reason"]) == (False, 401, "invalid_api_key")


def test_the_image_checks_mounted_policies(podman: Podman, image: str, policy_copy: Path) -> None:
    for path in policy_copy.iterdir():
        path.chmod(0o644)  # readable by the image's user
    policy_copy.chmod(0o755)
    mount = f"{policy_copy}:/etc/policy-engine/policies:ro"
    check = ("check", "/etc/policy-engine/policies")
    good = podman("run", "--rm", "--volume", mount, image, *check, check=False)
    assert good.returncode == 0 and good.stdout.startswith("ok:"), good.stdout + good.stderr
    tested = podman(
        "run", "--rm", "--volume", mount, image, "test", "/etc/policy-engine/policies", check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr

    broken = policy_copy / "routing.yaml"
    broken.write_text(broken.read_text().replace("when:", "when: ((", 1))
    bad = podman("run", "--rm", "--volume", mount, image, *check, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "routing.yaml:" in bad.stdout + bad.stderr
