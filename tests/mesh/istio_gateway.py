"""An Envoy configuration assembled the way istiod assembles an ingress gateway's from
policy-engine's mesh config and EnvoyFilter, so that a real Envoy can run the mesh's filter chain
here. No istiod runs on this machine (no build of it installs from the registries it reaches):
the assembly follows Istio's generator for the parts policy-engine relies on, not all of it:
- the HTTP filters: ext_authz (the CUSTOM AuthorizationPolicy's), then the RBAC filter of ALLOW
  and DENY AuthorizationPolicies and the fault filter of VirtualService faults, then the router;
  here the RBAC filter denies requests carrying `RBAC_DENY_HEADER` and the fault filter aborts
  those carrying `FAULT_ABORT_HEADER`, so a test can have either answer after the Check;
- the EnvoyFilter's MERGE, INSERT_AFTER and INSERT_BEFORE patches applied to that chain;
- Istio's default retry policy on every route (two retries on connection failures and refused
  streams);
- clusters named by service and subset (`outbound|PORT|SUBSET|HOST`, a subset per backend) and
  routes named after their backends, as mesh/'s DestinationRules and VirtualService name them;
- the access log of the `envoyHttpAls` provider (pilot's buildHTTPGrpcAccessLogHelper: log name,
  headers, Istio's filter-state objects, Envoy's default buffering, no custom tags).
"""

from __future__ import annotations

import copy
from typing import Any

from policy_engine.envoy.bootstrap import POLICY_CLUSTER
from policy_engine.mesh.envoyfilter import EXT_AUTHZ, ROUTER, istio_cluster
from policy_engine.telemetry.access_log import BACKEND_CLUSTER_PREFIX

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


def istio_subset_cluster(backend: str) -> str:
    """Istio's cluster for a DestinationRule subset named after the backend, as in mesh/."""
    return f"outbound|8000|{backend}|{backend}.models.svc.cluster.local"


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


RBAC_DENY_HEADER = "x-test-rbac-deny"
FAULT_ABORT_HEADER = "x-test-fault-abort"
PREVIOUS_HOSTS = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
# Istio's default retry policy (pilot's retry.DefaultPolicy) of a route without `retries`.
ISTIO_RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": f"type.googleapis.com/{PREVIOUS_HOSTS}"},
        }
    ],
    "host_selection_retry_max_attempts": 5,
}


def _present(header: str) -> dict[str, Any]:
    return {"name": header, "present_match": True}


def istio_rbac() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "DENY",
                "policies": {
                    "ns[istio-system]-policy[deny-test]-rule[0]": {
                        "permissions": [{"header": _present(RBAC_DENY_HEADER)}],
                        "principals": [{"any": True}],
                    }
                },
            },
        },
    }


def istio_fault() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": 503, "percentage": {"numerator": 100}},
            "headers": [_present(FAULT_ABORT_HEADER)],
        },
    }


def apply_patches(filters: list[dict[str, Any]], patches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The HTTP_FILTER patches of an EnvoyFilter applied in order, as istiod applies them."""
    chain = copy.deepcopy(filters)
    for patch in patches:
        target = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        index = next(i for i, f in enumerate(chain) if f["name"] == target)
        operation, value = patch["patch"]["operation"], copy.deepcopy(patch["patch"]["value"])
        if operation == "MERGE":
            chain[index]["typed_config"].update(value["typed_config"])
        elif operation == "INSERT_BEFORE":
            chain.insert(index, value)
        elif operation == "INSERT_AFTER":
            chain.insert(index + 1, value)
        else:
            raise ValueError(f"operation {operation!r} is not one policy-engine's EnvoyFilter uses")
    return chain


def istio_gateway(
    document: dict[str, Any],
    patches: list[dict[str, Any]],
    access_log_provider: dict[str, Any] | None = None,
    cluster: str = ISTIO_CLUSTER,
) -> dict[str, Any]:
    """`document`, a bootstrap of `policy_engine.envoy.bootstrap`, with its HTTP filter chain
    replaced by Istio's (ext_authz with `clear_route_cache` off, as Istio may emit it, RBAC,
    fault, router) with the EnvoyFilter's patches applied; Istio's retry policy on its routes;
    the policy and backend clusters and the routes named as Istio names them; and, given the
    `envoyHttpAls` provider, the access log istiod makes of it."""
    config = copy.deepcopy(document)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f for f in manager["http_filters"]}
    authz = filters[EXT_AUTHZ]
    authz["typed_config"]["clear_route_cache"] = False
    istio_chain = [authz, istio_rbac(), istio_fault(), filters[ROUTER]]
    manager["http_filters"] = apply_patches(istio_chain, patches)
    backends: dict[str, str] = {}  # the bootstrap's backend cluster -> Istio's
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            if "cluster" in route.get("route", {}):
                name = route["route"]["cluster"].removeprefix(BACKEND_CLUSTER_PREFIX)
                backends[route["route"]["cluster"]] = istio_subset_cluster(name)
                route["name"] = name  # the VirtualService route's name, as in mesh/
                route["route"]["cluster"] = backends[route["route"]["cluster"]]
                route["route"]["retry_policy"] = copy.deepcopy(ISTIO_RETRY_POLICY)
    for upstream in config["static_resources"]["clusters"]:
        if upstream["name"] in backends:
            upstream["name"] = upstream["load_assignment"]["cluster_name"] = backends[upstream["name"]]
    if access_log_provider is not None:
        manager["access_log"] = [istio_access_log(access_log_provider, cluster)]
    config = retarget(config, cluster)
    policy = next(c for c in config["static_resources"]["clusters"] if c["name"] == POLICY_CLUSTER)
    policy["name"] = cluster
    return config
