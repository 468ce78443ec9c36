"""`policy-engine envoy-config` prints what the end-to-end tests run, and Envoy accepts it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import yaml

from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap
from tests.e2e.harness import ROOT, envoy_binary


def printed_and_valid(tmp_path: object, arguments: list[str], expected: GatewayConfig) -> dict[str, Any]:
    """`envoy-config ARGUMENTS` prints the bootstrap of `expected`, and Envoy accepts it."""
    result = subprocess.run(
        [sys.executable, "-m", "policy_engine", "envoy-config", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    printed: dict[str, Any] = yaml.safe_load(result.stdout)
    assert printed == bootstrap(expected)
    path = tmp_path / "envoy.yaml"  # type: ignore[operator]
    path.write_text(result.stdout)
    validated = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    return printed


def test_printed_config_is_the_tested_one_and_valid(tmp_path: object) -> None:
    arguments = ["--listen-port", "10000", "--backend", "model-a=127.0.0.1:8001"]
    arguments += ["--backend", "model-b=model-b.models.svc:8000"]
    backends = {"model-a": Upstream("127.0.0.1", 8001), "model-b": Upstream("model-b.models.svc", 8000)}
    printed = printed_and_valid(
        tmp_path, arguments, GatewayConfig(listen_address="0.0.0.0", backends=backends)
    )
    filters = [
        f["name"]
        for f in printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]["http_filters"]
    ]
    # Usage is charged from the access log: no rate-limit call per request, each request marked
    # for charging in its dynamic metadata, which the access-log entry carries.
    assert filters == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.set_metadata",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    manager = printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (mark,) = manager["http_filters"][1]["typed_config"]["metadata"]
    assert mark == {"metadata_namespace": "policy_engine.charge", "value": {"via": "access_log"}}
    (log,) = manager["access_log"]
    assert log["name"] == "envoy.access_loggers.http_grpc"
    authz = printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ][0]["typed_config"]
    assert authz["clear_route_cache"] is True and authz["with_request_body"]["allow_partial_message"] is True


def test_bad_backend_argument_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "policy_engine", "envoy-config", "--backend", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "NAME=HOST:PORT" in result.stderr


def test_http_transport_config_is_the_tested_one_and_valid(tmp_path: object) -> None:
    expected = GatewayConfig(
        listen_address="0.0.0.0", authz_transport="http", policy_http=Upstream("127.0.0.1", 9002)
    )
    printed = printed_and_valid(tmp_path, ["--policy-http", "127.0.0.1:9002"], expected)
    manager = printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    # Client x-pe-* headers are stripped before ext_authz asks over HTTP.
    assert names[:2] == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz"]
    authz = manager["http_filters"][1]["typed_config"]
    assert authz["http_service"]["server_uri"]["uri"] == "http://127.0.0.1:9002"
    assert "grpc_service" not in authz
    # The rate-limit service (token charging) and the access log stay on gRPC.
    clusters = {c["name"] for c in printed["static_resources"]["clusters"]}
    assert {"policy-engine", "policy-engine-http"} <= clusters


def test_native_usage_extraction_config_is_the_tested_one_and_valid(tmp_path: object) -> None:
    printed = printed_and_valid(
        tmp_path,
        ["--usage-extraction", "native"],
        GatewayConfig(listen_address="0.0.0.0", usage_extraction="native"),
    )
    manager = printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    assert names[-3:] == [
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.sse_to_metadata",
        "envoy.filters.http.router",
    ]
    assert "envoy.filters.http.lua" not in names


def test_an_unknown_usage_extraction_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="usage_extraction"):
        GatewayConfig(usage_extraction="wasm")  # type: ignore[arg-type]


def test_rate_limit_charging_config_is_the_tested_one_and_valid(tmp_path: object) -> None:
    printed = printed_and_valid(
        tmp_path, ["--charging", "rate-limit"], GatewayConfig(listen_address="0.0.0.0", charging="rate_limit")
    )
    manager = printed["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    assert "envoy.filters.http.ratelimit" in names
    # Unmarked entries: the service must not charge them a second time.
    assert "envoy.filters.http.set_metadata" not in names
