"""The EnvoyFilter that gives an Istio gateway the filters `policy-engine envoy-config` gives Envoy.

Istio inserts the ext_authz filter itself (from the `envoyExtAuthzGrpc` extension provider and a
CUSTOM AuthorizationPolicy); the rest of the chain comes from the builders in
`policy_engine.envoy.bootstrap`, the ones the end-to-end tests run with a real Envoy:

- a MERGE into Istio's ext_authz filter setting `clear_route_cache`, because routes match the
  `x-pe-route` header the service adds (the provider's `clearRouteCache` is accepted by Istio's
  MeshConfig, but some Istio versions do not pass it on to Envoy);
- the filter that makes the usage charged after the response: by default the set_metadata
  filter that marks each request for charging from the gateway's access-log stream, which the
  Telemetry resource sends to the service anyway (no call per request); or, with
  `charging="rate_limit"`, the rate-limit filter with the token-charging entries
  (`apply_on_stream_done`), a gRPC call per response;
- the filter that reads the backend's reported usage from JSON and SSE responses (Lua, unless
  the config asks for Envoy's native filters, which an Istio proxy older than Envoy 1.38
  lacks: an unknown filter type makes the proxy reject the whole listener).

The chart includes the patches from a JSON file per charging path (`PATCH_FILES`), with
placeholders (`PLACEHOLDERS`) it fills from its values; `envoy_filter` renders a complete
resource the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from policy_engine.envoy.bootstrap import (
    ChargingPath,
    GatewayConfig,
    charging_filter,
    ext_authz_filter,
    usage_filters,
)

HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
CLUSTER_PLACEHOLDER = "@@POLICY_CLUSTER@@"
CONTEXT_PLACEHOLDER = "@@PATCH_CONTEXT@@"
PLACEHOLDERS = (CLUSTER_PLACEHOLDER, CONTEXT_PLACEHOLDER)
CONTEXTS = ("GATEWAY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "ANY")


def istio_cluster(host: str, port: int) -> str:
    """The name Istio gives the outbound cluster of a service port."""
    return f"outbound|{port}||{host}"


def _http_filter_match(context: str, sub_filter: str) -> dict[str, Any]:
    return {
        "context": context,
        "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": sub_filter}}}},
    }


def envoy_filter_patches(
    config: GatewayConfig | None = None,
    cluster: str = CLUSTER_PLACEHOLDER,
    context: str = CONTEXT_PLACEHOLDER,
) -> list[dict[str, Any]]:
    """`spec.configPatches`, in the order Envoy must run the filters: the charging filter right
    after ext_authz, the usage readers right before the router."""
    gateway = config if config is not None else GatewayConfig()
    authz = ext_authz_filter(gateway)["typed_config"]
    route_cache = {"@type": authz["@type"], "clear_route_cache": authz["clear_route_cache"]}
    return [
        {
            "applyTo": "HTTP_FILTER",
            "match": _http_filter_match(context, EXT_AUTHZ),
            "patch": {"operation": "MERGE", "value": {"name": EXT_AUTHZ, "typed_config": route_cache}},
        },
        {
            # Right after ext_authz, as in the bootstrap: a request that Istio's own later
            # filters answer (an AuthorizationPolicy's RBAC, a VirtualService fault) is then
            # still marked, and its reservation comes back (it reached no backend).
            "applyTo": "HTTP_FILTER",
            "match": _http_filter_match(context, EXT_AUTHZ),
            "patch": {"operation": "INSERT_AFTER", "value": charging_filter(gateway.charging, cluster)},
        },
        *(
            {
                "applyTo": "HTTP_FILTER",
                "match": _http_filter_match(context, ROUTER),
                "patch": {"operation": "INSERT_BEFORE", "value": usage},
            }
            for usage in usage_filters(gateway.usage_extraction)
        ),
    ]


# The chart's patch files, with placeholders, by `istio.tokenCharging`.
PATCH_FILES: dict[str, tuple[str, ChargingPath]] = {
    "accessLog": ("envoyfilter-patches.json", "access_log"),
    "rateLimit": ("envoyfilter-patches-ratelimit.json", "rate_limit"),
}


def patches_file(charging: ChargingPath = "access_log") -> str:
    """A chart file of `PATCH_FILES`: the patches with placeholders."""
    patches = envoy_filter_patches(GatewayConfig(charging=charging))
    return json.dumps(patches, indent=2, sort_keys=False) + "\n"


@dataclass(frozen=True)
class MeshTarget:
    """Where the filter goes and where the service is."""

    name: str = "policy-engine"
    namespace: str = "istio-system"
    selector: tuple[tuple[str, str], ...] = (("istio", "ingressgateway"),)
    context: str = "GATEWAY"
    service_host: str = "policy-engine.policy-engine.svc.cluster.local"
    grpc_port: int = 9001


def envoy_filter(target: MeshTarget, config: GatewayConfig | None = None) -> dict[str, Any]:
    """A complete EnvoyFilter resource."""
    if target.context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, not {target.context!r}")
    patches = envoy_filter_patches(
        config, istio_cluster(target.service_host, target.grpc_port), target.context
    )
    spec: dict[str, Any] = {"configPatches": patches}
    if target.selector:
        spec = {"workloadSelector": {"labels": dict(target.selector)}, **spec}
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": target.name, "namespace": target.namespace},
        "spec": spec,
    }
