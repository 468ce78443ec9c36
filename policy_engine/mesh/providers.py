"""The `meshConfig.extensionProviders` entries that connect Istio to the service.

A chart cannot set mesh config (it belongs to the Istio installation), so these entries are
printed for the operator to merge into istiod's values: ext_authz over gRPC (request body,
`clearRouteCache`, timeout, fail mode and the error status taken from the same builder as the
Envoy bootstrap), the gRPC access log that feeds live telemetry and carries the token charges
(unless the gateway charges through the rate-limit service), and an OpenTelemetry tracer.

No Istio CRD covers MeshConfig, so `MeshConfigSnippet` checks the shape of what is printed:
the fields of Istio's `istio.mesh.v1alpha1.MeshConfig.ExtensionProvider` messages that are
used here, in their JSON names, unknown fields rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policy_engine.envoy.bootstrap import GatewayConfig, ext_authz_filter, grpc_access_log

AUTHZ_PROVIDER = "policy-engine"
ACCESS_LOG_PROVIDER = "policy-engine-als"
TRACING_PROVIDER = "policy-engine-otel"
# Placeholders the chart fills (NOTES.txt); the port placeholders stand for JSON numbers.
SERVICE_HOST_PLACEHOLDER = "@@SERVICE_HOST@@"
GRPC_PORT_PLACEHOLDER = "@@GRPC_PORT@@"
OTLP_HOST_PLACEHOLDER = "@@OTLP_HOST@@"
OTLP_PORT_PLACEHOLDER = "@@OTLP_PORT@@"

Port = Annotated[int, Field(ge=1, le=65535)]
Duration = Annotated[str, Field(pattern=r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestBody(_Strict):
    maxRequestBytes: int = Field(ge=1)
    allowPartialMessage: bool = False
    packAsBytes: bool = False


class ExtAuthzGrpc(_Strict):
    service: str = Field(min_length=1)
    port: Port
    timeout: Duration | None = None
    failOpen: bool = False
    statusOnError: str | None = Field(default=None, pattern=r"^[1-5][0-9][0-9]$")
    includeRequestBodyInCheck: RequestBody | None = None
    clearRouteCache: bool = False


class HttpAccessLog(_Strict):
    service: str = Field(min_length=1)
    port: Port
    logName: str | None = None
    filterStateObjectsToLog: list[str] = []
    additionalRequestHeadersToLog: list[str] = []
    additionalResponseHeadersToLog: list[str] = []
    additionalRequestTrailersToLog: list[str] = []
    additionalResponseTrailersToLog: list[str] = []


class OpenTelemetryTracing(_Strict):
    service: str = Field(min_length=1)
    port: Port
    maxTagLength: int | None = None


class ExtensionProvider(_Strict):
    name: str = Field(min_length=1)
    envoyExtAuthzGrpc: ExtAuthzGrpc | None = None
    envoyHttpAls: HttpAccessLog | None = None
    opentelemetry: OpenTelemetryTracing | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ExtensionProvider:
        kinds = [k for k in ("envoyExtAuthzGrpc", "envoyHttpAls", "opentelemetry") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"provider {self.name!r} must set exactly one kind, has {kinds or 'none'}")
        return self


class _MeshConfig(_Strict):
    extensionProviders: list[ExtensionProvider]


class MeshConfigSnippet(_Strict):
    """`meshConfig:` as in istiod's Helm values (or an IstioOperator's `spec`)."""

    meshConfig: _MeshConfig


def validate_mesh_config(document: Any) -> list[str]:
    """Errors in a mesh config snippet, each with its path; empty when it is well formed."""
    try:
        MeshConfigSnippet.model_validate(document)
    except ValidationError as error:
        return [
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in error.errors(include_url=False)
        ]
    return []


@dataclass(frozen=True)
class ServiceAddress:
    host: str
    port: int | str  # a str is a placeholder


def _status(code_name: str) -> str:
    """Envoy's status code name (`ServiceUnavailable`) as the number Istio expects."""
    for status in HTTPStatus:
        if status.phrase.replace(" ", "").replace("-", "") == code_name:
            return str(status.value)
    raise ValueError(f"unknown HTTP status name {code_name!r}")


def extension_providers(
    service: ServiceAddress, otlp: ServiceAddress | None = None, config: GatewayConfig | None = None
) -> list[dict[str, Any]]:
    gateway = config if config is not None else GatewayConfig()
    authz = ext_authz_filter(gateway)["typed_config"]
    body = authz["with_request_body"]
    access_log = grpc_access_log(gateway)["typed_config"]
    providers: list[dict[str, Any]] = [
        {
            "name": AUTHZ_PROVIDER,
            "envoyExtAuthzGrpc": {
                "service": service.host,
                "port": service.port,
                "timeout": authz["grpc_service"]["timeout"],
                "failOpen": authz["failure_mode_allow"],
                "statusOnError": _status(authz["status_on_error"]["code"]),
                "includeRequestBodyInCheck": {
                    "maxRequestBytes": body["max_request_bytes"],
                    "allowPartialMessage": body["allow_partial_message"],
                    "packAsBytes": body["pack_as_bytes"],
                },
                "clearRouteCache": authz["clear_route_cache"],
            },
        },
        {
            "name": ACCESS_LOG_PROVIDER,
            "envoyHttpAls": {
                "service": service.host,
                "port": service.port,
                "logName": access_log["common_config"]["log_name"],
                "additionalResponseHeadersToLog": access_log["additional_response_headers_to_log"],
            },
        },
    ]
    if otlp is not None:
        providers.append(
            {"name": TRACING_PROVIDER, "opentelemetry": {"service": otlp.host, "port": otlp.port}}
        )
    return providers


def mesh_config(
    service: ServiceAddress, otlp: ServiceAddress | None = None, config: GatewayConfig | None = None
) -> dict[str, Any]:
    return {"meshConfig": {"extensionProviders": extension_providers(service, otlp, config)}}


def providers_file() -> str:
    """The chart's `files/extension-providers.json`, with placeholders for the addresses."""
    snippet = mesh_config(
        ServiceAddress(SERVICE_HOST_PLACEHOLDER, GRPC_PORT_PLACEHOLDER),
        ServiceAddress(OTLP_HOST_PLACEHOLDER, OTLP_PORT_PLACEHOLDER),
    )
    return json.dumps(snippet["meshConfig"]["extensionProviders"], indent=2) + "\n"
