"""The Helm chart: lint, render with several values files, validate every object it renders.

Rendering uses the real Helm binary; objects are validated without a Kubernetes API server
(none can run here): Istio kinds against Istio's CRD schemas and CEL rules, built-in kinds
against Kubernetes' JSON schemas in strict mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.audit.tracing import tracer_provider
from policy_engine.mesh.crds import CrdSchemas
from policy_engine.mesh.providers import validate_mesh_config
from policy_engine.policy.compiler import load_bundle
from policy_engine.server import backend_specs
from tests.conftest import POLICIES
from tests.mesh.rendering import CHART, VALUES, by_kind, helm, render, validate_object

VALUE_SETS = {
    "defaults": (),
    "everything": ("--values", str(VALUES / "everything.yaml")),
    "redis-monitoring-hpa": ("--values", str(VALUES / "redis-monitoring-hpa.yaml")),
}


def test_helm_lint_strict_passes_for_every_values_file() -> None:
    for name, args in VALUE_SETS.items():
        result = helm("lint", "--strict", str(CHART), *args)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_rendered_object_validates(values: str, crds: CrdSchemas) -> None:
    objects = render(*VALUE_SETS[values])
    assert len(objects) >= 5
    errors = [
        f"{o.get('kind')}/{o.get('metadata', {}).get('name')}: {e}"
        for o in objects
        for e in validate_object(o, crds)
    ]
    assert errors == []


def test_the_defaults_render_the_core_objects_only() -> None:
    kinds = sorted(o["kind"] for o in render())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]


def test_everything_on_renders_every_optional_object() -> None:
    kinds = {o["kind"] for o in render(*VALUE_SETS["everything"])}
    assert kinds >= {
        "AuthorizationPolicy",
        "EnvoyFilter",
        "Telemetry",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "Secret",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(main)


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_pod_runs_non_root_read_only_without_privileges(values: str) -> None:
    objects = render(*VALUE_SETS[values])
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container(objects)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Whatever the service writes goes to volumes, never the image's filesystem.
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["/etc/policy-engine/policies"]["readOnly"] is True
    assert {"/tmp", "/var/lib/policy-engine"} <= set(mounts)


def test_probes_use_grpc_health_on_the_grpc_port() -> None:
    main = container(render())
    port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"] == {"port": port}, probe


def test_the_service_exposes_grpc_and_metrics() -> None:
    (service,) = by_kind(render(), "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 9001 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-metrics"]["port"] == 9090


def test_the_policies_configmap_holds_loadable_policies(tmp_path: Path) -> None:
    objects = render(*VALUE_SETS["everything"])
    configmap = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-policies"))
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    bundle = load_bundle(tmp_path)
    assert "extra-access" in {p.name for p in bundle.policies()}


def test_the_charts_policy_files_are_the_examples_without_tenants() -> None:
    chart_files = {p.name: p.read_text() for p in (CHART / "files" / "policies").glob("*.yaml")}
    examples = {
        p.name: p.read_text()
        for p in POLICIES.glob("*.yaml")
        if not p.name.endswith("_test.yaml") and p.name != "tenants.yaml"
    }
    assert chart_files == examples


def test_tenants_and_redis_come_from_secrets() -> None:
    objects = render(*VALUE_SETS["everything"])
    main = container(objects)
    assert all(e["name"] != "PE_REDIS_CLUSTER" for e in main["env"])  # a single server by default
    redis = next(e for e in main["env"] if e["name"] == "PE_REDIS_URL")
    secret_name = redis["valueFrom"]["secretKeyRef"]["name"]
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    assert secrets[secret_name]["stringData"]["url"].startswith("redis://")
    (deployment,) = by_kind(objects, "Deployment")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "policies")
    sources = volume["projected"]["sources"]
    tenants = next(s["secret"] for s in sources if "secret" in s)
    assert "tenants.yaml" in secrets[tenants["name"]]["stringData"]


def test_an_existing_redis_secret_is_referenced_not_created() -> None:
    objects = render(*VALUE_SETS["redis-monitoring-hpa"])
    env = container(objects)["env"]
    redis = next(e for e in env if e["name"] == "PE_REDIS_URL")
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "redis-credentials", "key": "redis-url"}
    assert {"name": "PE_REDIS_CLUSTER", "value": "true"} in env
    assert by_kind(objects, "Secret") == []
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (deployment,) = by_kind(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count


def test_redis_without_a_url_or_secret_fails_clearly() -> None:
    result = helm("template", "pe", str(CHART), "--set", "redis.enabled=true")
    assert result.returncode != 0
    assert "redis.enabled needs redis.url or redis.existingSecret" in result.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("service.grpcPort=abc", "service.grpcPort: Invalid type. Expected: integer, given: string"),
        ("workers=0", "workers: Must be greater than or equal to 1"),
        ("istio.patchContext=GATEWAYS", "istio.patchContext: istio.patchContext must be one of"),
        ("redis.url=http://redis:6379", "redis.url: Does not match pattern"),
        ("replicas=3", "Additional property replicas is not allowed"),
        ("backends[0].url=http://x", "Additional property url is not allowed"),
        ("backends[0].capacity=8", "name is required"),
        ("backends[0].name=a,backends[0].metrics_url=x:8000", "metrics_url: Does not match pattern"),
    ],
)
def test_values_schema_rejects_bad_values(setting: str, message: str) -> None:
    result = helm("template", "pe", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_mesh_config_the_chart_prints_is_well_formed() -> None:
    objects = render(*VALUE_SETS["everything"])
    configmap = next(
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-mesh-config")
    )
    snippet = yaml.safe_load(configmap["data"]["mesh-config.yaml"])
    assert validate_mesh_config(snippet) == []
    providers = {p["name"]: p for p in snippet["meshConfig"]["extensionProviders"]}
    authz = providers["policy-engine"]["envoyExtAuthzGrpc"]
    assert authz["service"] == "pe-policy-engine.policy-engine.svc.cluster.local"
    assert authz["port"] == 9001
    assert authz["clearRouteCache"] is True
    assert authz["includeRequestBodyInCheck"]["maxRequestBytes"] == 1048576
    assert authz["failOpen"] is False


def test_the_istio_objects_name_the_providers_of_the_mesh_config() -> None:
    objects = render(*VALUE_SETS["everything"])
    configmap = next(
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-mesh-config")
    )
    providers = {
        p["name"]
        for p in yaml.safe_load(configmap["data"]["mesh-config.yaml"])["meshConfig"]["extensionProviders"]
    }
    (policy,) = by_kind(objects, "AuthorizationPolicy")
    assert policy["spec"]["action"] == "CUSTOM" and policy["spec"]["provider"]["name"] in providers
    (telemetry,) = by_kind(objects, "Telemetry")
    used = {
        p["name"]
        for entry in telemetry["spec"]["accessLogging"] + telemetry["spec"]["tracing"]
        for p in entry["providers"]
    }
    assert used <= providers


def test_dashboards_are_included_from_the_chart_directory() -> None:
    objects = render(*VALUE_SETS["everything"])
    dashboards = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboards")]
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    if not files:
        assert dashboards == []  # no dashboard written yet: no empty ConfigMap either
        return
    (configmap,) = dashboards
    assert sorted(configmap["data"]) == files
    for name in files:
        json.loads(configmap["data"][name])


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("redis://redis.data:6379/0", True),
        ("rediss://redis.data:6380/0", True),
        ("redis+sentinel://sentinel.data:26379/quotas/0", True),
        ("rediss+sentinel://sentinel.data:26379/quotas/0", True),
        ("http://redis.data:6379", False),
    ],
)
def test_the_redis_url_schemes_the_service_takes_are_accepted(url: str, accepted: bool) -> None:
    result = helm("template", "pe", str(CHART), "--set", "redis.enabled=true", "--set", f"redis.url={url}")
    assert (result.returncode == 0) == accepted, result.stderr


def test_the_backends_reach_the_service_as_its_backends_file(tmp_path: Path) -> None:
    """`backends` becomes the file `--backends-file` reads, mounted where PE_BACKENDS_FILE says;
    a change restarts the pods (the file is read at start)."""
    objects = render(*VALUE_SETS["everything"])
    (configmap,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-backends")]
    main = container(objects)
    env = {e["name"]: e.get("value") for e in main["env"]}
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "backends"]
    assert env["PE_BACKENDS_FILE"] == f"{mount['mountPath']}/backends.yaml"
    path = tmp_path / "backends.yaml"
    path.write_text(configmap["data"]["backends.yaml"])
    specs = {spec.name: spec for spec in backend_specs([], path)}
    assert specs["llama-8b-a"].capacity == 64 and specs["llama-8b-a"].region == "eu"
    assert specs["llama-8b-a"].metrics_url == "http://llama-8b-a.models:8000/metrics"
    assert specs["llama-8b-b"].passive and specs["llama-8b-b"].labels == {"gpu": "a100"}

    def checksum(*extra: str) -> str:
        (deployment,) = by_kind(render(*VALUE_SETS["everything"], *extra), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/settings"])

    assert checksum() != checksum("--set", "backends[1].capacity=4")
    # Without backends: no file, no setting.
    defaults = render()
    assert not [o for o in by_kind(defaults, "ConfigMap") if o["metadata"]["name"].endswith("-backends")]
    assert "PE_BACKENDS_FILE" not in {e["name"] for e in container(defaults)["env"]}


def test_a_redis_url_without_redis_enabled_fails_clearly() -> None:
    result = helm("template", "pe", str(CHART), "--set", "redis.url=redis://redis:6379/0")
    assert result.returncode != 0
    assert "redis.url is set but redis.enabled is false" in result.stderr


def test_a_stopping_pod_serves_through_its_pre_stop_sleep_then_drains() -> None:
    main = container(render())
    assert main["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["PE_GRACE_S"] == "20"  # 30 s of grace: 5 asleep, 20 draining, 5 to exit
    assert env["PE_WORKERS"] == "1"
    without = container(render("--set", "preStopSleepSeconds=0"))
    assert "lifecycle" not in without
    short = helm("template", "pe", str(CHART), "--set", "terminationGracePeriodSeconds=12")
    assert short.returncode != 0 and "at least preStopSleepSeconds + 10" in short.stderr


def test_the_authorization_policy_matches_each_host_with_any_port() -> None:
    """The gateway routes `Host: name:443` like `name`; an AuthorizationPolicy matches exactly."""
    hosts = "istio.hosts={models.example.com,b.example.com:8443}"
    objects = render("--set", "istio.enabled=true", "--set", hosts)
    (policy,) = by_kind(objects, "AuthorizationPolicy")
    (operation,) = [o["operation"] for rule in policy["spec"]["rules"] for o in rule["to"]]
    names = ["models.example.com", "models.example.com:*", "b.example.com", "b.example.com:*"]
    assert operation["hosts"] == names
    # A wildcard could not match the host with a port: refused, with why.
    wildcard = helm("template", "pe", str(CHART), "--set", "istio.hosts={*.example.com}")
    assert wildcard.returncode != 0 and "istio.hosts.0: Does not match pattern" in wildcard.stderr


def test_a_gateway_elsewhere_is_selected_everywhere_and_may_call_the_service() -> None:
    """A gateway of another namespace and labels: the Istio objects select it by exactly the
    labels given (Helm would merge a default map with them), and the NetworkPolicy admits it."""
    objects = render(
        "--set", "istio.enabled=true", "--set", "istio.gatewayNamespace=ai-gateway",
        "--set-json", 'istio.gatewaySelector={"app":"ai-gw"}',
    )  # fmt: skip
    for kind in ("AuthorizationPolicy", "Telemetry"):
        (resource,) = by_kind(objects, kind)
        assert resource["spec"]["selector"] == {"matchLabels": {"app": "ai-gw"}}, kind
        assert resource["metadata"]["namespace"] == "ai-gateway"
    (envoy_filter,) = by_kind(objects, "EnvoyFilter")
    assert envoy_filter["spec"]["workloadSelector"] == {"labels": {"app": "ai-gw"}}
    (policy,) = by_kind(objects, "NetworkPolicy")
    grpc = policy["spec"]["ingress"][0]
    assert grpc["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ai-gateway"}},
            "podSelector": {"matchLabels": {"app": "ai-gw"}},
        }
    ]
    # The defaults: Istio's ingress gateway; and a list given replaces the derived peer.
    (default,) = by_kind(render(), "NetworkPolicy")
    (peer,) = default["spec"]["ingress"][0]["from"]
    assert peer["podSelector"] == {"matchLabels": {"istio": "ingressgateway"}}
    anywhere = 'networkPolicy.grpcFrom=[{"namespaceSelector":{}}]'
    (anyone,) = by_kind(render("--set-json", anywhere), "NetworkPolicy")
    assert anyone["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {}}]


def test_tracing_gives_the_service_the_otel_settings_its_tracer_reads() -> None:
    """The rendered OTEL_* variables make the service's tracer (the real SDK) export over OTLP
    to the collector of the gateway's spans, unless another endpoint is given."""
    rendered = container(render("--set", "tracing.enabled=true"))
    env = {e["name"]: e["value"] for e in rendered["env"] if "value" in e}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc.cluster.local:4317"
    provider = tracer_provider(env)
    assert provider is not None
    provider.shutdown()
    elsewhere = render("--set", "tracing.enabled=true", "--set", "tracing.endpoint=http://collector:4317")
    endpoint = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4317"}
    assert endpoint in container(elsewhere)["env"]
    assert not [e for e in container(render())["env"] if e["name"].startswith("OTEL_")]


def test_prometheus_can_scrape_the_service_under_strict_mtls() -> None:
    """Without the ServiceMonitor, the prometheus.io annotations, which Istio's metrics merging
    turns into a scrape of the sidecar's plain-text port 15020 (admitted only as the metrics port
    is, by metricsFrom); with it, the metrics port alone accepting plain text, and no annotation
    (a second, discovered scrape)."""
    scrapers = 'networkPolicy.metricsFrom=[{"podSelector":{}}]'
    objects = render("--set", "istio.enabled=true", "--set-json", scrapers)
    (deployment,) = by_kind(objects, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9090"
    (policy,) = by_kind(objects, "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    (metrics,) = [rule for rule in rules if {"port": 9090, "protocol": "TCP"} in rule["ports"]]
    assert {"port": 15020, "protocol": "TCP"} in metrics["ports"] and metrics["from"] == [{"podSelector": {}}]
    assert by_kind(objects, "PeerAuthentication") == []
    monitored = render(*VALUE_SETS["everything"])
    (deployment,) = by_kind(monitored, "Deployment")
    assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"]["annotations"]
    (peer,) = by_kind(monitored, "PeerAuthentication")
    assert peer["spec"]["portLevelMtls"] == {9090: {"mode": "PERMISSIVE"}}
    assert "mtls" not in peer["spec"]  # every other port keeps the namespace's mode
    assert peer["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # podAnnotations given win, and an empty one renders.
    own = render("--set-json", 'podAnnotations={"prometheus.io/scrape":"false"}')
    (deployment,) = by_kind(own, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    assert by_kind(render("--set", "podAnnotations=null"), "Deployment")


def test_with_istio_the_sidecar_drains_as_long_as_the_service() -> None:
    (deployment,) = by_kind(render("--set", "istio.enabled=true"), "Deployment")
    config = deployment["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    assert json.loads(config) == {"terminationDrainDuration": "25s"}  # the grace period less 5 s
    (plain,) = by_kind(render(), "Deployment")
    assert "proxy.istio.io/config" not in plain["spec"]["template"]["metadata"]["annotations"]


def test_the_gateway_keeps_the_access_log_providers_it_is_told_to() -> None:
    """The chart's Telemetry replaces the gateway's default access-log providers; extra ones are
    kept. Tracing takes one provider (Istio's Telemetry API)."""
    extra = 'istio.telemetry.extraAccessLogProviders=["envoy"]'
    objects = render("--set", "istio.enabled=true", "--set-json", extra)
    (telemetry,) = by_kind(objects, "Telemetry")
    (logging,) = telemetry["spec"]["accessLogging"]
    assert logging["providers"] == [{"name": "policy-engine-als"}, {"name": "envoy"}]
    (tracing,) = telemetry["spec"]["tracing"]
    assert tracing["providers"] == [{"name": "policy-engine-otel"}]
