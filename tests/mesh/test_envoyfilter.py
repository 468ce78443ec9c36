"""One source: the EnvoyFilter of the chart and of mesh/ carries the filters the e2e Envoy runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.envoy.bootstrap import (
    ChargingPath,
    GatewayConfig,
    Upstream,
    bootstrap,
    ext_authz_filter,
)
from policy_engine.mesh.cli import CHART_FILES
from policy_engine.mesh.envoyfilter import EXT_AUTHZ, PATCH_FILES, ROUTER, MeshTarget, envoy_filter
from policy_engine.mesh.providers import (
    ServiceAddress,
    extension_providers,
    mesh_config,
    validate_mesh_config,
)
from tests.e2e.harness import envoy_binary
from tests.mesh.istio_gateway import ISTIO_CLUSTER, apply_patches, istio_gateway, retarget
from tests.mesh.rendering import CHART, MESH, by_kind, helm, load_manifests, render

GATEWAY = GatewayConfig(backends={"llama-8b-a": Upstream("127.0.0.1", 8001)})


# The chart's istio.tokenCharging values and the GatewayConfig.charging each stands for.
CHARGING: dict[str, ChargingPath] = {value: charging for value, (_, charging) in PATCH_FILES.items()}


def e2e_filters(charging: ChargingPath = "access_log") -> list[dict[str, Any]]:
    """The HTTP filters of the bootstrap the end-to-end tests run (token_gateway[grpc] charges
    from the access log, token_gateway[grpc-ratelimit] through the rate-limit service)."""
    config = dataclasses.replace(GATEWAY, charging=charging)
    listener = bootstrap(config)["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(manager["http_filters"])


def chart_envoy_filter(charging: str = "accessLog") -> dict[str, Any]:
    (resource,) = by_kind(
        render("--set", "istio.enabled=true", "--set", f"istio.tokenCharging={charging}"), "EnvoyFilter"
    )
    return resource


def test_the_chart_files_are_generated_from_the_builders() -> None:
    for name, generate in CHART_FILES.items():
        path = CHART / "files" / name
        assert path.read_text(encoding="utf-8") == generate(), (
            f"{path} is stale: run `policy-engine mesh-config chart-files`"
        )


@pytest.mark.parametrize("charging", CHARGING)
def test_the_chart_envoy_filter_makes_istios_chain_the_e2e_chain(charging: str) -> None:
    """The chart's patches applied to the chain istiod makes (ext_authz, router) give the chain
    the end-to-end tests run, filter for filter."""
    patches = chart_envoy_filter(charging)["spec"]["configPatches"]
    e2e = [retarget(f, ISTIO_CLUSTER) for f in e2e_filters(CHARGING[charging])]
    authz = copy.deepcopy(e2e[0])
    authz["typed_config"]["clear_route_cache"] = False
    assert apply_patches([authz, e2e[-1]], patches) == e2e
    names = [f["name"] for f in e2e]
    if charging == "rateLimit":
        assert names == [EXT_AUTHZ, "envoy.filters.http.ratelimit", "envoy.filters.http.lua", ROUTER]
        # the token charge: after the stream, hits from the usage the Lua filter stored
        entries = e2e[1]["typed_config"]["rate_limits"]
        assert entries and all(e["apply_on_stream_done"] for e in entries)
        assert all("policy_engine.usage" in e["hits_addend"]["format"] for e in entries)
    else:
        # each request marked for charging from the access-log stream, no call per response
        assert names == [EXT_AUTHZ, "envoy.filters.http.set_metadata", "envoy.filters.http.lua", ROUTER]
        assert "envoy.filters.http.ratelimit" not in json.dumps(patches)
    # The charging filter goes right after ext_authz (before Istio's RBAC and fault filters,
    # whose local answers must still be marked), the usage readers right before the router.
    (charge,) = [p for p in patches if p["patch"]["value"]["name"] == names[1]]
    assert charge["patch"]["operation"] == "INSERT_AFTER"
    assert charge["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == EXT_AUTHZ


def test_charging_from_the_access_log_needs_the_chart_telemetry() -> None:
    """Without the Telemetry resource the gateway's access log never reaches the service, and no
    token would be charged: the chart refuses, and says what to set."""
    refused = helm(
        "template", "pe", str(CHART), "-n", "policy-engine",
        "--set", "istio.enabled=true", "--set", "istio.telemetry.enabled=false",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "istio.tokenCharging=rateLimit" in refused.stderr and "istio.telemetry.enabled" in refused.stderr
    documents = render(
        "--set", "istio.enabled=true", "--set", "istio.telemetry.enabled=false",
        "--set", "istio.tokenCharging=rateLimit",
    )  # fmt: skip
    (resource,) = by_kind(documents, "EnvoyFilter")
    assert "envoy.filters.http.ratelimit" in json.dumps(resource)
    assert by_kind(documents, "Telemetry") == []


def test_the_route_cache_merge_matches_the_e2e_ext_authz() -> None:
    (merge,) = [
        p for p in chart_envoy_filter()["spec"]["configPatches"] if p["patch"]["operation"] == "MERGE"
    ]
    authz = ext_authz_filter(GATEWAY)
    assert merge["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == authz["name"]
    merged = merge["patch"]["value"]["typed_config"]
    assert merged == {"@type": authz["typed_config"]["@type"], "clear_route_cache": True}
    assert authz["typed_config"]["clear_route_cache"] is True


def test_the_chart_fills_context_and_cluster_from_values() -> None:
    (resource,) = by_kind(
        render(
            "--set",
            "istio.enabled=true",
            "--set",
            "istio.patchContext=SIDECAR_INBOUND",
            "--set",
            "service.grpcPort=7000",
            "--set",
            "istio.tokenCharging=rateLimit",  # the patch that names the service's cluster
        ),
        "EnvoyFilter",
    )
    text = json.dumps(resource)
    assert "@@" not in text
    assert {p["match"]["context"] for p in resource["spec"]["configPatches"]} == {"SIDECAR_INBOUND"}
    assert "outbound|7000||pe-policy-engine.policy-engine.svc.cluster.local" in text


def test_the_mesh_directory_files_are_current() -> None:
    (filter_on_disk,) = load_manifests(MESH / "envoyfilter.yaml")
    assert filter_on_disk == envoy_filter(MeshTarget())
    (snippet,) = load_manifests(MESH / "mesh-config.yaml")
    service = ServiceAddress("policy-engine.policy-engine.svc.cluster.local", 9001)
    collector = ServiceAddress("otel-collector.observability.svc.cluster.local", 4317)
    assert snippet == mesh_config(service, collector)
    assert validate_mesh_config(snippet) == []


def test_a_malformed_mesh_config_is_rejected() -> None:
    (snippet,) = load_manifests(MESH / "mesh-config.yaml")
    bad = copy.deepcopy(snippet)
    bad["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]["port"] = "9001x"
    bad["meshConfig"]["extensionProviders"][1]["envoyHttpAls"]["clearRouteCache"] = True
    errors = validate_mesh_config(bad)
    assert any(e.startswith("meshConfig.extensionProviders.0.envoyExtAuthzGrpc.port:") for e in errors)
    assert any(e.startswith("meshConfig.extensionProviders.1.envoyHttpAls.clearRouteCache:") for e in errors)


@pytest.mark.parametrize("charging", CHARGING)
def test_envoy_accepts_the_chart_filter_chain(tmp_path: Path, charging: str) -> None:
    """The gateway's chain as Istio assembles it (its ext_authz, then the EnvoyFilter's inserts
    with the MERGE applied, then the router), checked by Envoy itself with --mode validate."""
    (provider,) = [p for p in extension_providers(ServiceAddress("pe", 9001)) if "envoyHttpAls" in p]
    patches = chart_envoy_filter(charging)["spec"]["configPatches"]
    config = istio_gateway(bootstrap(GATEWAY), patches, provider)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = manager["http_filters"][0]
    assert manager["access_log"][0]["typed_config"]["common_config"]["grpc_service"] == {
        "envoy_grpc": {"cluster_name": ISTIO_CLUSTER}
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert authz["typed_config"]["clear_route_cache"] is True


def test_a_native_usage_envoy_filter_inserts_both_native_readers_in_order() -> None:
    """The mesh keeps Lua by default; asked for Envoy's native readers it inserts both."""
    native = envoy_filter(MeshTarget(), GatewayConfig(usage_extraction="native"))
    authz = {"name": EXT_AUTHZ, "typed_config": {}}
    chain = apply_patches([authz, {"name": ROUTER}], native["spec"]["configPatches"])
    assert [f["name"] for f in chain] == [
        EXT_AUTHZ,
        "envoy.filters.http.set_metadata",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.sse_to_metadata",
        ROUTER,
    ]
