"""`envoy-config --otlp-endpoint`: Envoy's OpenTelemetry tracer on the gateway (run for real in
tests/e2e/test_audit.py)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from policy_engine.cli import app
from policy_engine.envoy.bootstrap import OTLP_CLUSTER, GatewayConfig, bootstrap

runner = CliRunner()


def _manager(config: dict[str, object]) -> dict[str, object]:
    listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def test_no_tracing_unless_asked() -> None:
    config = bootstrap(GatewayConfig())
    assert "tracing" not in _manager(config)
    assert OTLP_CLUSTER not in {c["name"] for c in config["static_resources"]["clusters"]}


def test_otlp_endpoint_adds_the_tracer_and_its_cluster() -> None:
    result = runner.invoke(app, ["envoy-config", "--otlp-endpoint", "otel-collector.observability:4317"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.stdout)
    tracing = _manager(config)["tracing"]
    assert tracing["random_sampling"] == {"value": 100}
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER]
    assert cluster["type"] == "STRICT_DNS"  # a host name, resolved by Envoy
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "otel-collector.observability",
        "port_value": 4317,
    }
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])  # OTLP is gRPC


def test_bad_otlp_endpoint_is_a_clear_error() -> None:
    result = runner.invoke(app, ["envoy-config", "--otlp-endpoint", "collector"])
    assert result.exit_code == 2 and "--otlp-endpoint must be HOST:PORT" in result.stderr


def test_serve_rejects_an_unknown_trace_exporter() -> None:
    result = runner.invoke(app, ["serve", "--policies", "policies"], env={"OTEL_TRACES_EXPORTER": "jaeger"})
    assert result.exit_code == 2 and "invalid tracing settings" in result.stderr and "jaeger" in result.stderr
