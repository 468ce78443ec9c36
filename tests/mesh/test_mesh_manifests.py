"""The sample AI gateway in mesh/: valid for Istio, and consistent with the example policies."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from policy_engine.decide.quota import RATE_LIMIT_HEADERS
from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap
from policy_engine.mesh.crds import CrdSchemas
from policy_engine.policy.compiler import load_bundle
from tests.conftest import POLICIES
from tests.mesh.rendering import MESH, by_kind, load_manifests

ISTIO_FILES = sorted(p for p in MESH.glob("*.yaml") if p.name != "mesh-config.yaml")


def all_manifests() -> list[dict[str, Any]]:
    return [doc for path in ISTIO_FILES for doc in load_manifests(path)]


@pytest.mark.parametrize("path", ISTIO_FILES, ids=lambda p: p.name)
def test_every_mesh_manifest_validates_against_the_istio_crds(path: Path, crds: CrdSchemas) -> None:
    documents = load_manifests(path)
    assert documents
    for document in documents:
        assert crds.validate(document) == [], f"{document['kind']}/{document['metadata']['name']}"


def virtual_service() -> dict[str, Any]:
    (resource,) = by_kind(all_manifests(), "VirtualService")
    return resource


def test_a_weight_given_as_a_string_fails_validation(crds: CrdSchemas) -> None:
    bad = copy.deepcopy(virtual_service())
    rollout = next(r for r in bad["spec"]["http"] if r["name"] == "llama-70b-rollout")
    rollout["route"][1]["weight"] = "10"
    errors = crds.validate(bad)
    assert len(errors) == 1 and errors[0].endswith("'10' is not of type 'integer'")
    assert errors[0].startswith("spec.http[")


def test_an_unknown_field_fails_validation(crds: CrdSchemas) -> None:
    bad = copy.deepcopy(virtual_service())
    bad["spec"]["http"][0]["match"][0]["header"] = {"x-pe-route": {"exact": "x"}}
    errors = crds.validate(bad)
    assert errors == [
        "spec.http[0].match[0]: Additional properties are not allowed ('header' was unexpected)"
    ]


def test_peer_authentication_is_strict_and_destinations_use_istio_mutual() -> None:
    manifests = all_manifests()
    assert {p["spec"]["mtls"]["mode"] for p in by_kind(manifests, "PeerAuthentication")} == {"STRICT"}
    for rule in by_kind(manifests, "DestinationRule"):
        assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL", rule["metadata"]["name"]


def test_every_routed_backend_is_a_backend_of_the_routing_policy_and_has_a_subset() -> None:
    bundle = load_bundle(POLICIES)
    backends = {
        name
        for policy in bundle.routing
        for route in policy.routes
        for name in (*route.candidates, *route.fallback)
    }
    subsets = {
        (rule["spec"]["host"], subset["name"])
        for rule in by_kind(all_manifests(), "DestinationRule")
        for subset in rule["spec"].get("subsets", [])
    }
    routed = 0
    for http in virtual_service()["spec"]["http"]:
        for match in http.get("match", []):
            value = match.get("headers", {}).get("x-pe-route", {}).get("exact")
            if value is not None:
                routed += 1
                assert value in backends, value
        for destination in http.get("route", []):
            target = destination["destination"]
            assert (target["host"], target["subset"]) in subsets, target
    assert routed >= 4


def test_every_route_to_a_backend_strips_what_the_gateways_own_routes_strip() -> None:
    """As the routes of `envoy-config` do: the client's accept-encoding (a compressed answer hides
    its usage from the usage reader), and the backend's own x-ratelimit-* answer headers, which
    would reach the client beside the tenant's that the service adds."""
    (model_route,) = [
        r
        for r in bootstrap(GatewayConfig(backends={"m": Upstream("127.0.0.1", 1)}))["static_resources"][
            "listeners"
        ][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        if "cluster" in r.get("route", {})
    ]
    routes = [h for h in virtual_service()["spec"]["http"] if h.get("route")]
    assert len(routes) >= 5
    for http in routes:
        headers = http["headers"]
        assert headers["request"]["remove"] == model_route["request_headers_to_remove"], http["name"]
        assert set(headers["response"]["remove"]) == set(RATE_LIMIT_HEADERS), http["name"]
    assert set(model_route["response_headers_to_remove"]) == set(RATE_LIMIT_HEADERS)


def test_no_route_reaches_a_backend_without_a_decision() -> None:
    """Every route to a backend matches only paths the CUSTOM AuthorizationPolicy sends to
    policy-engine, whose answer removes a client's own x-pe-* headers; and the policy matches its
    hosts with any port too, as the gateway routes them. Otherwise a client could name its own
    backend in x-pe-route on another path, or with `Host: name:443`."""
    policies = by_kind(all_manifests(), "AuthorizationPolicy")
    (policy,) = [p for p in policies if p["spec"]["action"] == "CUSTOM"]
    (operation,) = [o["operation"] for rule in policy["spec"]["rules"] for o in rule["to"]]
    decided = [path.removesuffix("*") for path in operation["paths"] if path.endswith("/*")]
    assert decided == ["/v1/"]
    for http in virtual_service()["spec"]["http"]:
        if not http.get("route"):
            continue
        for match in http["match"]:
            assert any(match["uri"]["prefix"].startswith(prefix) for prefix in decided), http["name"]
    for host in virtual_service()["spec"]["hosts"]:
        assert {host, f"{host}:*"} <= set(operation["hosts"])


def test_the_rollout_route_splits_between_the_canary_policys_backends() -> None:
    (canary,) = load_bundle(POLICIES).canary
    rollout = next(r for r in virtual_service()["spec"]["http"] if r["name"] == "llama-70b-rollout")
    weights = {d["destination"]["subset"]: d["weight"] for d in rollout["route"]}
    assert weights == {canary.stable: 100 - canary.weight, canary.canary: canary.weight}
    assert rollout["match"][0]["headers"][canary.header]["prefix"]


def test_the_authorization_policy_and_telemetry_name_the_mesh_config_providers() -> None:
    (snippet,) = load_manifests(MESH / "mesh-config.yaml")
    providers = {p["name"] for p in snippet["meshConfig"]["extensionProviders"]}
    manifests = all_manifests()
    (policy,) = by_kind(manifests, "AuthorizationPolicy")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] in providers
    (telemetry,) = by_kind(manifests, "Telemetry")
    entries = telemetry["spec"]["accessLogging"] + telemetry["spec"]["tracing"]
    assert {p["name"] for entry in entries for p in entry["providers"]} <= providers
