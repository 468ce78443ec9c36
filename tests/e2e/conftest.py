from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policy_engine.demo.backend import BackendServer
from policy_engine.envoy.bootstrap import Upstream
from policy_engine.mesh.envoyfilter import envoy_filter_patches
from policy_engine.mesh.providers import ServiceAddress, extension_providers
from tests.e2e.harness import EnvoyProcess, ServiceProcess, free_port, start_envoy, start_service
from tests.mesh.istio_gateway import ISTIO_CLUSTER, istio_gateway

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
TOKEN_POLICIES = Path(__file__).resolve().parent / "policies"

FREE = {"authorization": "Bearer sk-hobby-free-key-0003"}
PRO = {"authorization": "Bearer sk-globex-pro-key-0002"}
PREMIUM = {"authorization": "Bearer sk-acme-premium-key-0001"}


@dataclass
class Gateway:
    service: ServiceProcess
    envoy: EnvoyProcess
    backends: dict[str, BackendServer]
    policies: Path

    @property
    def url(self) -> str:
        return self.envoy.url

    def stop(self) -> None:
        self.envoy.stop()
        self.service.stop()
        for backend in self.backends.values():
            backend.stop()


def gateway(
    policies: Path,
    names: list[str],
    transport: str = "grpc",
    envoy_options: dict[str, object] | None = None,
    **service_options: object,
) -> Gateway:
    """`transport`: how Envoy asks for decisions, gRPC Check or the HTTP ext_authz protocol;
    `envoy_options`: more GatewayConfig fields for Envoy's bootstrap."""
    backends = {name: BackendServer(name).start() for name in names}
    envoy_options = dict(envoy_options or {})
    if transport == "http":
        http_port = free_port()
        extra = [*service_options.pop("extra_args", ()), "--http-port", str(http_port)]  # type: ignore[misc]
        service_options["extra_args"] = extra
        envoy_options.update(authz_transport="http", policy_http=Upstream("127.0.0.1", http_port))
    service = start_service(policies, backends=names, **service_options)  # type: ignore[arg-type]
    envoy = start_envoy(service.port, {name: b.port for name, b in backends.items()}, **envoy_options)
    return Gateway(service, envoy, backends, policies)


TRANSPORTS = ["grpc", "http"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def example_gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """The example policies behind a real Envoy, with three simulated backends; once with each
    ext_authz transport."""
    gw = gateway(EXAMPLES, ["llama-8b-a", "llama-8b-b", "embed-a"], transport=request.param)
    yield gw
    gw.stop()


@pytest.fixture(params=TRANSPORTS)
def fresh_example_gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """Like example_gateway, with counters of its own."""
    gw = gateway(EXAMPLES, ["llama-8b-a", "llama-8b-b"], transport=request.param)
    yield gw
    gw.stop()


def copied_gateway(
    tmp_path: Path,
    without_quotas: bool = False,
    transport: str = "grpc",
    envoy_options: dict[str, object] | None = None,
) -> Iterator[Gateway]:
    import shutil

    policies = tmp_path / "policies"
    shutil.copytree(TOKEN_POLICIES, policies)
    if without_quotas:
        policy = policies / "policy.yaml"
        documents = policy.read_text().split("---\n")
        policy.write_text("---\n".join(d for d in documents if "kind: QuotaPolicy" not in d))
    gw = gateway(policies, ["model-a", "model-b"], transport=transport, envoy_options=envoy_options)
    yield gw
    gw.stop()


def as_istio_gateway(document: dict[str, Any]) -> dict[str, Any]:
    """The mesh's chain as istiod assembles it (tests/mesh/istio_gateway.py): Istio's ext_authz,
    the EnvoyFilter's patches (charging from the access log) and the access log of the
    `envoyHttpAls` provider, which carries no tag and flushes at Envoy's default 1 s."""
    (provider,) = [p for p in extension_providers(ServiceAddress("pe", 9001)) if "envoyHttpAls" in p]
    return istio_gateway(document, envoy_filter_patches(cluster=ISTIO_CLUSTER, context="GATEWAY"), provider)


TOKEN_VARIANTS: dict[str, dict[str, object]] = {
    "native": {"usage_extraction": "native"},
    "ratelimit": {"charging": "rate_limit"},
    "istio": {"assemble": as_istio_gateway},
}


@pytest.fixture(params=[*TRANSPORTS, "grpc-native", "grpc-ratelimit", "grpc-istio"])
def token_gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """Small token budgets (tests/e2e/policies, copied so a test may edit them); once with each
    ext_authz transport (the charge rides on the metadata either answer carries), once with the
    usage read by Envoy's native json_to_metadata and sse_to_metadata instead of Lua, once
    charged by a rate-limit call per response instead of from the access log, and once through
    the mesh's filter chain and access log, assembled as istiod would."""
    transport, _, variant = request.param.partition("-")
    options = dict(TOKEN_VARIANTS[variant]) if variant else {}
    yield from copied_gateway(tmp_path, transport=transport, envoy_options=options)


@pytest.fixture
def reload_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """The token-test policies without their quotas: traffic may run as long as a test needs."""
    yield from copied_gateway(tmp_path, without_quotas=True)
