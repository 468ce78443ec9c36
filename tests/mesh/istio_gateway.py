"""An Envoy configuration assembled the way istiod assembles an ingress gateway's from
policy-engine's mesh config and EnvoyFilter, so that a real Envoy can run the mesh's filter chain
here. No istiod runs on this machine (no build of it installs from the registries it reaches):
the assembly follows Istio's generator for the parts policy-engine relies on: the ext_authz filter
from the `envoyExtAuthzGrpc` provider, the EnvoyFilter's MERGE and INSERT_BEFORE patches, clusters
named by service, and the access log of the `envoyHttpAls` provider (pilot's
buildHTTPGrpcAccessLogHelper: log name, headers, Istio's filter-state objects, Envoy's default
buffering, no custom tags)."""

from __future__ import annotations

import copy
from typing import Any

from policy_engine.envoy.bootstrap import POLICY_CLUSTER
from policy_engine.mesh.envoyfilter import EXT_AUTHZ, ROUTER, istio_cluster

ISTIO_CLUSTER = istio_cluster("pe-policy-engine.policy-engine.svc.cluster.local", 9001)
# The filter-state objects Istio (1.24 and later) asks an HTTP gRPC access log to carry.
ISTIO_FILTER_STATE = [
    "upstream_peer",
    "downstream_peer",
    "wasm.upstream_peer",
    "wasm.upstream_peer_id",
    "wasm.downstream_peer",
    "wasm.downstream_peer_id",
]


def retarget(value: Any, cluster: str) -> Any:
    """A copy of `value` with every reference to the policy cluster renamed (Istio names clusters
    by service)."""
    if isinstance(value, dict):
        return {
            k: cluster if k == "cluster_name" and v == POLICY_CLUSTER else retarget(v, cluster)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [retarget(v, cluster) for v in value]
    return value


def istio_access_log(provider: dict[str, Any], cluster: str) -> dict[str, Any]:
    """What istiod generates for an `envoyHttpAls` extension provider."""
    settings = provider["envoyHttpAls"]
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": settings.get("logName", "http_envoy_accesslog"),
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                "transport_api_version": "V3",
                "filter_state_objects_to_log": settings.get("filterStateObjectsToLog", ISTIO_FILTER_STATE),
            },
            "additional_request_headers_to_log": settings.get("additionalRequestHeadersToLog", []),
            "additional_response_headers_to_log": settings.get("additionalResponseHeadersToLog", []),
            "additional_response_trailers_to_log": settings.get("additionalResponseTrailersToLog", []),
        },
    }


def istio_gateway(
    document: dict[str, Any],
    patches: list[dict[str, Any]],
    access_log_provider: dict[str, Any] | None = None,
    cluster: str = ISTIO_CLUSTER,
) -> dict[str, Any]:
    """`document`, a bootstrap of `policy_engine.envoy.bootstrap`, with its HTTP filter chain
    replaced by Istio's ext_authz (`clear_route_cache` off, as Istio may emit it; the MERGE patch
    sets it), the EnvoyFilter's inserts and the router; the policy cluster renamed as Istio names
    it; and, given the `envoyHttpAls` provider, the access log istiod makes of it."""
    config = copy.deepcopy(document)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f for f in manager["http_filters"]}
    authz = filters[EXT_AUTHZ]
    authz["typed_config"]["clear_route_cache"] = False
    for patch in patches:
        if patch["patch"]["operation"] == "MERGE":
            authz["typed_config"].update(patch["patch"]["value"]["typed_config"])
    inserted = [p["patch"]["value"] for p in patches if p["patch"]["operation"] == "INSERT_BEFORE"]
    manager["http_filters"] = [authz, *inserted, filters[ROUTER]]
    if access_log_provider is not None:
        manager["access_log"] = [istio_access_log(access_log_provider, cluster)]
    config = retarget(config, cluster)
    policy = next(c for c in config["static_resources"]["clusters"] if c["name"] == POLICY_CLUSTER)
    policy["name"] = cluster
    return config
