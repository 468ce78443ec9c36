"""The mesh executor through the real `kubernetes` client against a STAND-IN API server.

No Kubernetes API server can run on this machine; `apiserver_standin.ApiServerStandIn` honours
the contract the executor relies on (GET/PUT/PATCH, resourceVersion with 409, 422 with Istio's
CRD schema errors) on loopback. Every VirtualService written is validated against the CRD schema.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from policy_engine.canary.mesh import GROUP, MeshError, MeshExecutor
from policy_engine.mesh.crds import CrdSchemas
from tests.canary.apiserver_standin import ApiServerStandIn

NS = "models"
MESH = Path(__file__).resolve().parents[2] / "mesh"

VIRTUAL_SERVICE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "llama-70b", "namespace": NS},
    "spec": {
        "hosts": ["llama-70b"],
        "http": [
            {
                "name": "other",
                "route": [{"destination": {"host": "embed", "subset": "v1"}, "weight": 100}],
            },
            {
                "name": "canary",
                "route": [
                    {"destination": {"host": "llama-70b", "subset": "llama-70b-v1"}, "weight": 100},
                    {"destination": {"host": "llama-70b", "subset": "llama-70b-v2"}, "weight": 0},
                ],
            },
        ],
    },
}
DESTINATION_RULE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "llama-70b", "namespace": NS},
    "spec": {
        "host": "llama-70b",
        "subsets": [
            {"name": "llama-70b-v1", "labels": {"version": "v1"}},
            {"name": "llama-70b-v2", "labels": {"version": "v2"}},
        ],
    },
}


@pytest.fixture
def standin(crds: CrdSchemas) -> Iterator[ApiServerStandIn]:
    server = ApiServerStandIn(crds).start()
    server.put_object(copy.deepcopy(VIRTUAL_SERVICE))
    server.put_object(copy.deepcopy(DESTINATION_RULE))
    yield server
    server.stop()


@pytest.fixture
def api(standin: ApiServerStandIn) -> Iterator[CustomObjectsApi]:
    configuration = Configuration(host=standin.url)
    with ApiClient(configuration) as client:
        yield CustomObjectsApi(client)


def weights(standin: ApiServerStandIn) -> list[int]:
    route = standin.objects[(NS, "virtualservices", "llama-70b")]["spec"]["http"][1]["route"]
    return [entry["weight"] for entry in route]


@pytest.mark.parametrize("write", ["replace", "patch"])
def test_weights_are_written_and_valid(
    standin: ApiServerStandIn, api: CustomObjectsApi, crds: CrdSchemas, write: str
) -> None:
    executor = MeshExecutor(api, NS, "llama-70b", write=write)  # type: ignore[arg-type]
    for weight in (5, 25, 100, 0):
        assert executor.apply_sync("llama-70b-v1", "llama-70b-v2", weight) is True
        assert weights(standin) == [100 - weight, weight]
        assert crds.validate(standin.objects[(NS, "virtualservices", "llama-70b")]) == []
    untouched = standin.objects[(NS, "virtualservices", "llama-70b")]["spec"]["http"][0]
    assert untouched["route"][0]["weight"] == 100
    assert executor.apply_sync("llama-70b-v1", "llama-70b-v2", 0) is False  # already there: no write
    methods = {method for method, path, _ in standin.requests if "virtualservices" in path}
    assert methods == {"GET", "PUT" if write == "replace" else "PATCH"}


def test_conflict_is_retried_with_a_fresh_read(standin: ApiServerStandIn, api: CustomObjectsApi) -> None:
    def concurrent_edit() -> None:  # another writer changes the object between our read and write
        obj = copy.deepcopy(standin.objects[(NS, "virtualservices", "llama-70b")])
        obj["spec"]["http"][0]["timeout"] = "30s"
        with standin.lock:
            standin._store(NS, "virtualservices", "llama-70b", obj)

    for write in ("replace", "patch"):
        standin.before_write = concurrent_edit
        executor = MeshExecutor(api, NS, "llama-70b", write=write)  # type: ignore[arg-type]
        target = 10 if write == "replace" else 20
        assert executor.apply_sync("llama-70b-v1", "llama-70b-v2", target)
        assert executor.conflicts == 1 and weights(standin) == [100 - target, target]
        # The other writer's change survived: the retry started from a fresh read.
        assert standin.objects[(NS, "virtualservices", "llama-70b")]["spec"]["http"][0]["timeout"] == "30s"


def test_the_merge_patch_trap_is_real_and_avoided(standin: ApiServerStandIn, api: CustomObjectsApi) -> None:
    operations = [{"op": "replace", "path": "/spec/http/1/route/1/weight", "value": 50}]
    # The trap: without a content type the client sends the JSON-patch list as a merge patch.
    with pytest.raises(ApiException) as caught:
        api.patch_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b", operations)
    assert caught.value.status == 422
    assert standin.requests[-1][2] == "application/merge-patch+json"
    executor = MeshExecutor(api, NS, "llama-70b", write="patch")
    assert executor.apply_sync("llama-70b-v1", "llama-70b-v2", 50)
    assert weights(standin) == [50, 50]
    assert standin.requests[-1][0] == "PATCH" and standin.requests[-1][2] == "application/json-patch+json"


def test_schema_errors_come_back_clearly(standin: ApiServerStandIn, api: CustomObjectsApi) -> None:
    """An object stored before its schema tightened cannot be written back: 422, reported with the
    schema's message, and nothing changes."""
    key = (NS, "virtualservices", "llama-70b")
    standin.objects[key]["spec"]["http"][0]["retriez"] = {"attempts": 3}  # bypasses validation
    before = copy.deepcopy(standin.objects[key])
    with pytest.raises(MeshError, match=r"422 .*retriez"):
        MeshExecutor(api, NS, "llama-70b").apply_sync("llama-70b-v1", "llama-70b-v2", 50)
    assert standin.objects[key] == before
    with pytest.raises(MeshError, match=r"0\.\.100"):
        MeshExecutor(api, NS, "llama-70b").apply_sync("llama-70b-v1", "llama-70b-v2", 150)


def test_missing_subset_and_missing_route_are_clear_errors(
    standin: ApiServerStandIn, api: CustomObjectsApi
) -> None:
    rule = copy.deepcopy(DESTINATION_RULE)
    rule["spec"]["subsets"] = rule["spec"]["subsets"][:1]
    rule["metadata"]["resourceVersion"] = standin.objects[(NS, "destinationrules", "llama-70b")]["metadata"][
        "resourceVersion"
    ]
    api.replace_namespaced_custom_object(GROUP, "v1", NS, "destinationrules", "llama-70b", rule)
    executor = MeshExecutor(api, NS, "llama-70b")
    with pytest.raises(MeshError, match="defines no subset llama-70b-v2"):
        executor.apply_sync("llama-70b-v1", "llama-70b-v2", 10)
    assert weights(standin) == [100, 0]
    with pytest.raises(MeshError, match="no destinations for both"):
        MeshExecutor(api, NS, "llama-70b").apply_sync("llama-70b-v1", "llama-70b-v9", 10)
    with pytest.raises(MeshError, match="404"):
        MeshExecutor(api, NS, "absent").apply_sync("llama-70b-v1", "llama-70b-v2", 10)


def test_the_standin_refuses_stale_and_invalid_writes(
    standin: ApiServerStandIn, api: CustomObjectsApi
) -> None:
    """The contract the executor is tested against: 409 on a stale version, 422 on schema errors."""
    obj = api.get_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b")
    assert isinstance(obj, dict)
    fresh = copy.deepcopy(obj)
    api.replace_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b", fresh)
    with pytest.raises(ApiException) as stale:
        api.replace_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b", obj)
    assert stale.value.status == 409
    bad = api.get_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b")
    assert isinstance(bad, dict)
    bad["spec"]["http"][1]["route"][0]["wieght"] = 3
    with pytest.raises(ApiException) as invalid:
        api.replace_namespaced_custom_object(GROUP, "v1", NS, "virtualservices", "llama-70b", bad)
    assert invalid.value.status == 422 and "wieght" in str(invalid.value.body)


def test_the_sample_gateway_finds_its_destination_rules_in_the_hosts_namespace(
    standin: ApiServerStandIn, api: CustomObjectsApi
) -> None:
    """mesh/: the VirtualService in ai-gateway, the DestinationRules next to the models."""
    for path in ("virtualservice.yaml", "destinationrules.yaml"):
        for document in yaml.safe_load_all((MESH / path).read_text()):
            if document:
                standin.put_object(document)
    executor = MeshExecutor(api, "ai-gateway", "models", route="llama-70b-rollout")  # type: ignore[arg-type]
    assert executor.apply_sync("llama-70b-a100-b", "llama-70b-v2", 25) is True
    written = standin.objects[("ai-gateway", "virtualservices", "models")]
    rollout = next(r for r in written["spec"]["http"] if r["name"] == "llama-70b-rollout")
    assert [d["weight"] for d in rollout["route"]] == [75, 25]


def test_an_unreachable_api_server_is_a_mesh_error() -> None:
    with ApiClient(Configuration(host="http://127.0.0.1:1")) as client:
        client.configuration.retries = 0
        executor = MeshExecutor(CustomObjectsApi(client), NS, "llama-70b")
        with pytest.raises(MeshError, match="cannot reach the Kubernetes API server"):
            executor.apply_sync("llama-70b-v1", "llama-70b-v2", 10)
