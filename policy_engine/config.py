"""Service settings: flags override environment variables (PE_*), which override defaults."""

from __future__ import annotations

import difflib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PE_", extra="forbid")

    policies: Path = Field(Path("policies"), description="Policy directory.")
    host: str = Field("0.0.0.0", description="gRPC listen address.")
    port: int = Field(9001, ge=0, le=65535, description="gRPC port (ext_authz, rate limit, health).")
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port for Envoy's HTTP ext_authz protocol (http_service), on --host; unset = off.",
    )
    metrics_host: str | None = Field(None, description="Metrics listen address; unset: the same as host.")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port; 0 = off.")
    workers: int = Field(1, ge=1, le=64, description="Processes sharing the gRPC port (SO_REUSEPORT).")
    redis_url: str | None = Field(
        None,
        description="redis://host:port/db (or redis+sentinel://sentinel:26379/GROUP/db) for shared "
        "counters; else memory.",
    )
    redis_cluster: bool = Field(
        False, description="redis_url names a node of a Redis Cluster: route each counter to its slot."
    )
    redis_timeout_s: float = Field(0.05, gt=0, description="Per-call Redis timeout.")
    reload: bool = Field(True, description="Watch the policy directory and hot-reload it.")
    max_body_bytes: int = Field(1_048_576, ge=0, description="Request body bytes the pipeline reads.")
    grace_s: float = Field(10.0, ge=0, description="Shutdown grace period for in-flight calls.")
    backends: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NAME (never stale; health from failures) or NAME=METRICS_URL (scraped).",
    )
    backends_file: Path | None = Field(
        None, description="YAML list of backends with metrics URL, capacity, region, version, labels."
    )
    stale_after_s: float = Field(
        5.0, gt=0, description="A scraped backend without fresh data this long is stale."
    )
    half_life_s: float = Field(
        10.0, gt=0, description="Half-life of the decaying backend statistics (latency, errors, rates)."
    )
    scrape_interval_s: float = Field(1.0, gt=0, description="How often backends' /metrics are scraped.")
    port_file: Path | None = Field(None, description="Write the bound gRPC port here once serving.")
    canary_state: Path = Field(
        Path(".policy-engine/canary-state.json"),
        description="Rollout state file, written only if a CanaryPolicy has a rollout (Redis if redis_url).",
    )
    canary_controller: bool = Field(
        True, description="Run the rollout controller in worker 0 (off when `canary run` drives the mesh)."
    )
    canary_refresh_s: float = Field(
        1.0, gt=0, description="How often every worker re-reads the rollout weights from the state store."
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate for TLS on the gRPC port (outside a mesh); with --tls-key."
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require and verify client certificates (mutual TLS)."
    )
    decision_log: str | None = Field(
        None, description="Decision log (JSON lines): a file path, or - for standard output; unset = off."
    )
    decision_log_sample: float = Field(
        1.0, ge=0, le=1, description="Fraction of allowed decisions logged (denials are always kept)."
    )
    decision_log_only: Literal["all", "deny", "allow"] = Field(
        "all", description="Log only denials, only allowed requests, or all."
    )
    decision_log_secrets: Literal["hash", "drop"] = Field(
        "hash", description="Credential headers in the log: a sha256 digest prefix, or dropped."
    )

    @model_validator(mode="after")
    def _workers_share_a_port(self) -> Settings:
        if self.workers > 1 and self.port == 0:
            raise ValueError("--workers > 1 needs a fixed --port (the workers share it)")
        return self

    @property
    def bind_host(self) -> str:
        """The listen address as sockets take it (`[::]`, gRPC's form, is `::`)."""
        return _bare(self.host)

    @property
    def grpc_address(self) -> str:
        host = self.bind_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return self.bind_host if self.metrics_host is None else _bare(self.metrics_host)

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return self

    @model_validator(mode="after")
    def _redis_url_usable(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("--redis-cluster needs --redis-url (any node of the cluster)")
        if self.redis_url:
            # Here rather than in a worker: a URL the store cannot honour stops the start. The
            # client connects on its first call only: making one checks the URL and its files.
            from policy_engine.quota.redis_store import redis_client

            try:
                redis_client(self.redis_url, cluster=self.redis_cluster, timeout_s=self.redis_timeout_s)
            except OSError as error:  # a CA or certificate file that cannot be read
                # The files' paths, not the URL: it may hold a password.
                query = urllib.parse.parse_qsl(urllib.parse.urlsplit(self.redis_url).query)
                files = ", ".join(f"{k}={v}" for k, v in query if k in _TLS_FILE_OPTIONS)
                raise ValueError(
                    f"redis URL: cannot read its TLS files ({files}): {error.strerror or error}"
                ) from None
        return self

    @field_validator("backends", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# PE_* variables read by other commands than `serve`.
_OTHER_COMMANDS_ENV = frozenset({"PE_ISTIO_CRDS"})


def unknown_settings(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """PE_* variables no setting reads (a misspelling is otherwise silently ignored), each with
    the setting it most resembles, if any."""
    known = {f"PE_{name.upper()}" for name in Settings.model_fields}
    read = known | _OTHER_COMMANDS_ENV
    unknown = sorted(name for name in environ if name.startswith("PE_") and name not in read)
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1)), None)) for name in unknown]
