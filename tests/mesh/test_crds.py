"""The Istio CRD validator: schema (types, unknown fields), metadata, and the CRDs' CEL rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.mesh.crds import (
    CRD_PATH_ENV,
    UNSUPPORTED_RULES,
    CrdFileNotFoundError,
    CrdSchemas,
    find_crd_file,
    load_crds,
)

VIRTUAL_SERVICE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "models", "namespace": "ai"},
    "spec": {
        "hosts": ["models.ai.svc.cluster.local"],
        "http": [
            {
                "match": [{"headers": {"x-pe-route": {"exact": "llama-8b-a"}}}],
                "route": [
                    {"destination": {"host": "llama-8b", "subset": "stable"}, "weight": 90},
                    {"destination": {"host": "llama-8b", "subset": "canary"}, "weight": 10},
                ],
                "timeout": "30s",
            }
        ],
    },
}

AUTHORIZATION_POLICY: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "policy-engine"},
    "spec": {
        "selector": {"matchLabels": {"istio": "ingressgateway"}},
        "action": "CUSTOM",
        "provider": {"name": "policy-engine"},
        "rules": [{"to": [{"operation": {"paths": ["/v1/*"]}}]}],
    },
}


def changed(base: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the value at `path` replaced."""
    result = copy.deepcopy(base)
    node: Any = result
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return result


def test_a_valid_virtual_service_passes(crds: CrdSchemas) -> None:
    assert crds.validate(VIRTUAL_SERVICE) == []


def test_a_weight_given_as_a_string_is_rejected_at_its_path(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["spec", "http", 0, "route", 1, "weight"], "10")
    assert crds.validate(bad) == ["spec.http[0].route[1].weight: '10' is not of type 'integer'"]


def test_an_unknown_field_is_rejected(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["spec", "http", 0, "route", 0, "wieght"], 90)
    errors = crds.validate(bad)
    assert len(errors) == 1
    assert errors[0].startswith("spec.http[0].route[0]: ")
    assert "'wieght' was unexpected" in errors[0]


def test_an_unknown_field_at_the_top_of_spec_is_rejected(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["spec", "routes"], [])
    assert any("'routes' was unexpected" in e for e in crds.validate(bad))


def test_preserve_unknown_fields_lets_an_envoy_filter_patch_carry_any_value(crds: CrdSchemas) -> None:
    envoy_filter = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "x"},
        "spec": {
            "configPatches": [
                {
                    "applyTo": "HTTP_FILTER",
                    "patch": {"operation": "INSERT_BEFORE", "value": {"anything": {"nested": [1, "two"]}}},
                }
            ]
        },
    }
    assert crds.validate(envoy_filter) == []
    bad = changed(envoy_filter, ["spec", "configPatches", 0, "patch", "operation"], "PREPEND")
    errors = crds.validate(bad)
    assert len(errors) == 1 and errors[0].startswith("spec.configPatches[0].patch.operation: 'PREPEND'")


def test_an_enum_value_outside_the_list_is_rejected(crds: CrdSchemas) -> None:
    bad = changed(AUTHORIZATION_POLICY, ["spec", "action"], "MAYBE")
    errors = crds.validate(bad)
    assert len(errors) == 1 and errors[0].startswith("spec.action: 'MAYBE' is not one of")


def test_a_cel_rule_of_the_authorization_policy_crd_is_evaluated(crds: CrdSchemas) -> None:
    assert crds.validate(AUTHORIZATION_POLICY) == []
    both = changed(
        AUTHORIZATION_POLICY, ["spec", "targetRefs"], [{"kind": "Gateway", "group": "", "name": "gw"}]
    )
    assert crds.validate(both) == ["spec: only one of targetRefs or selector can be set"]


def test_a_cel_rule_on_a_map_reports_its_message_at_the_path(crds: CrdSchemas) -> None:
    bad = changed(AUTHORIZATION_POLICY, ["spec", "selector", "matchLabels"], {"app": "gate*"})
    assert crds.validate(bad) == ["spec.selector.matchLabels.app: wildcard not allowed in label value match"]


def test_a_duration_rule_of_the_virtual_service_crd_is_evaluated(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["spec", "http", 0, "timeout"], "0s")
    assert crds.validate(bad) == ["spec.http[0].timeout: must be a valid duration greater than 1ms"]


def test_a_rule_that_cannot_evaluate_is_an_error_not_a_pass(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["spec", "http", 0, "timeout"], "soon")
    errors = crds.validate(bad)
    assert len(errors) == 1
    assert errors[0].startswith("spec.http[0].timeout: rule \"duration(self) >= duration('1ms')\" failed")


def test_the_kubernetes_url_functions_check_a_wasm_plugin_url(crds: CrdSchemas) -> None:
    plugin = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "p"},
        "spec": {"url": "oci://registry.example/filter:1"},
    }
    assert crds.validate(plugin) == []
    assert crds.validate(changed(plugin, ["spec", "url"], "registry.example/filter:1")) == []
    assert crds.validate(changed(plugin, ["spec", "url"], "ftp://registry.example/f")) == [
        "spec.url: url must have schema one of [http, https, file, oci]"
    ]


def test_the_jwks_uri_rule_requires_http(crds: CrdSchemas) -> None:
    authn = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt"},
        "spec": {"jwtRules": [{"issuer": "i", "jwksUri": "https://issuer.example/jwks"}]},
    }
    assert crds.validate(authn) == []
    bad = changed(authn, ["spec", "jwtRules", 0, "jwksUri"], "file:///etc/jwks")
    assert crds.validate(bad) == ["spec.jwtRules[0].jwksUri: url must have scheme http:// or https://"]


def test_metadata_needs_a_dns_name(crds: CrdSchemas) -> None:
    bad = changed(VIRTUAL_SERVICE, ["metadata", "name"], "Models_A")
    errors = crds.validate(bad)
    assert len(errors) == 1 and errors[0].startswith("metadata.name: 'Models_A' is not a DNS subdomain")


def test_an_unknown_kind_or_version_is_named(crds: CrdSchemas) -> None:
    errors = crds.validate(changed(VIRTUAL_SERVICE, ["apiVersion"], "networking.istio.io/v2"))
    assert errors == [
        "kind: no CRD serves networking.istio.io/v2 VirtualService "
        "(served: networking.istio.io/v1, networking.istio.io/v1alpha3, networking.istio.io/v1beta1)"
    ]
    assert crds.validate({"apiVersion": "v1", "kind": "Service"})[0].startswith("apiVersion: expected")


def test_every_rule_of_the_crd_file_compiles_or_is_allowlisted_with_a_reason(crds: CrdSchemas) -> None:
    rules = crds.rules()
    assert len(rules) > 30
    failing = {rule for rule in rules if not hasattr(crds.compile_rule(rule), "eval")}
    assert failing == set(UNSUPPORTED_RULES)
    assert all(reason.strip() for reason in UNSUPPORTED_RULES.values())


def synthetic_crd(tmp_path: Path, field_schema: dict[str, Any]) -> CrdSchemas:
    """A one-field CRD written to a file, for behaviour Istio's CRDs do not exercise."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.test"},
        "spec": {
            "group": "example.test",
            "names": {"kind": "Widget", "plural": "widgets"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object", "properties": {"field": field_schema}}},
                        }
                    },
                },
                {"name": "v0", "served": False, "storage": False, "schema": {"openAPIV3Schema": {}}},
            ],
        },
    }
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    return load_crds(path)


def widget(value: Any, version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": f"example.test/{version}",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"field": value},
    }


def test_a_rule_the_engine_cannot_compile_is_reported(tmp_path: Path) -> None:
    schemas = synthetic_crd(tmp_path, {"type": "string", "x-kubernetes-validations": [{"rule": "self.("}]})
    errors = schemas.validate(widget("x"))
    assert len(errors) == 1 and errors[0].startswith("spec.field: rule 'self.(' does not compile:")


def test_transition_rules_are_skipped_on_create_like_the_api_server(tmp_path: Path) -> None:
    rules = [{"rule": "self == oldSelf", "message": "immutable"}, {"rule": "self != 'x'", "message": "not x"}]
    schemas = synthetic_crd(tmp_path, {"type": "string", "x-kubernetes-validations": rules})
    assert schemas.validate(widget("y")) == []
    assert schemas.validate(widget("x")) == ["spec.field: not x"]


def test_int_or_string_and_nullable_are_honoured(tmp_path: Path) -> None:
    schemas = synthetic_crd(tmp_path, {"x-kubernetes-int-or-string": True, "nullable": True})
    for value in (8080, "http", None):
        assert schemas.validate(widget(value)) == [], value
    assert schemas.validate(widget(1.5)) != []
    assert synthetic_crd(tmp_path, {"type": "string"}).validate(widget(None)) != []


def test_a_set_list_rejects_duplicates(tmp_path: Path) -> None:
    schemas = synthetic_crd(
        tmp_path, {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}
    )
    assert schemas.validate(widget(["a", "b"])) == []
    assert schemas.validate(widget(["a", "b", "a"])) == ["spec.field[2]: duplicate entry 'a' (list type set)"]


def test_versions_that_are_not_served_are_not_accepted(tmp_path: Path) -> None:
    schemas = synthetic_crd(tmp_path, {"type": "string"})
    assert schemas.kinds() == ["example.test/v1 Widget"]
    assert schemas.validate(widget("x", version="v0"))[0].startswith("kind: no CRD serves")


def test_the_crd_file_is_found_through_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_path = tmp_path / "istio-crds.yaml"
    copy_path.write_text("")
    monkeypatch.setenv(CRD_PATH_ENV, str(copy_path))
    assert find_crd_file() == copy_path


def test_a_missing_crd_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(CrdFileNotFoundError, match=r"Istio CRD file not found: .*nowhere\.yaml"):
        load_crds(tmp_path / "nowhere.yaml")
