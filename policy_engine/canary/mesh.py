"""The mesh executor: canary weights written into an Istio VirtualService through the Kubernetes API.

For each `http` route of the VirtualService (or only the one named `route`) whose destinations
include both the stable and the canary (matched by `subset`, else by the host's first label),
the stable gets `100 - weight` and the canary `weight`. Writes are optimistic: the object is read,
changed and written back with the `resourceVersion` that was read, so a concurrent change makes
the API server answer 409 and the executor reads again and retries (a bounded number of times).
Nothing is written when the weights already match.

`write="replace"` sends the whole object (PUT). `write="patch"` sends an RFC 6902 JSON patch of
only the weights plus the resourceVersion: the Kubernetes client would send a list body as a
merge patch unless the JSON-patch content type is passed, which a real API server rejects (422).

Before writing, the DestinationRule of the destinations' host must define both subsets when the
route uses subsets: a VirtualService pointing at a missing subset sends traffic nowhere.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import urllib3
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from policy_engine.canary.controller import ExecutorError
from policy_engine.policy import bundle as b

log = logging.getLogger("policy_engine.canary.mesh")

GROUP = "networking.istio.io"
JSON_PATCH = "application/json-patch+json"
Write = Literal["replace", "patch"]


class MeshError(ExecutorError):
    pass


def _names(destination: dict[str, Any]) -> tuple[str, ...]:
    subset = destination.get("subset")
    if subset:
        return (str(subset),)
    host = str(destination.get("host", ""))
    return (host, host.split(".", 1)[0])


def _host_namespace(host: str, default: str) -> str:
    """The namespace of a service host name: `svc.ns` or `svc.ns.svc.cluster.local`; else `default`."""
    parts = host.split(".")
    return parts[1] if len(parts) >= 2 and (len(parts) == 2 or parts[2] == "svc") else default


def _api_message(error: ApiException) -> str:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return f"{error.status} {error.reason}: {message or error.body or ''}".strip()


def _routes(spec: dict[str, Any], route: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, http in enumerate(spec.get("http") or []):
        if isinstance(http, dict) and (route is None or http.get("name") == route):
            yield index, http


def plan(
    virtual_service: dict[str, Any], stable: str, canary: str, weight: int, route: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], set[str]]:
    """The object with the new weights, the JSON-patch operations to get there, and the hosts
    whose subsets must exist; MeshError if no route has both destinations."""
    updated = copy.deepcopy(virtual_service)
    operations: list[dict[str, Any]] = []
    subset_hosts: set[str] = set()
    matched = 0
    for index, http in _routes(updated.get("spec") or {}, route):
        destinations = http.get("route") or []
        found: dict[str, int] = {}
        for position, entry in enumerate(destinations):
            names = _names(entry.get("destination") or {})
            for role, name in (("stable", stable), ("canary", canary)):
                if name in names:
                    found[role] = position
        if len(found) < 2:
            continue
        matched += 1
        for role, value in (("stable", 100 - weight), ("canary", weight)):
            entry = destinations[found[role]]
            if entry.get("destination", {}).get("subset"):
                subset_hosts.add(str(entry["destination"].get("host", "")))
            if entry.get("weight") != value:
                entry["weight"] = value
                path = f"/spec/http/{index}/route/{found[role]}/weight"
                operations.append({"op": "add", "path": path, "value": value})
    if not matched:
        where = f"route {route!r}" if route else "any http route"
        name = virtual_service.get("metadata", {}).get("name", "?")
        raise MeshError(
            f"VirtualService {name}: {where} has no destinations for both {stable!r} and {canary!r} "
            "(matched by subset, else by host)"
        )
    return updated, operations, subset_hosts


class MeshExecutor:
    def __init__(
        self,
        api: CustomObjectsApi,
        namespace: str,
        virtual_service: str,
        *,
        route: str | None = None,
        destination_rule: str | None = None,
        write: Write = "replace",
        version: str = "v1",
        max_conflicts: int = 5,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.virtual_service = virtual_service
        self.route = route
        self.destination_rule = destination_rule
        self.write = write
        self.version = version
        self.max_conflicts = max_conflicts
        self.conflicts = 0  # 409s met so far (for tests and logs)
        self.writes = 0

    async def apply(self, policy: b.CanaryPolicy, weight: int) -> None:
        await asyncio.to_thread(self.apply_sync, policy.stable, policy.canary, weight)

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        try:
            found = self.api.get_namespaced_custom_object(GROUP, self.version, self.namespace, plural, name)
        except ApiException as error:
            raise MeshError(f"cannot read {plural} {self.namespace}/{name}: {_api_message(error)}") from None
        if not isinstance(found, dict):
            raise MeshError(f"{plural} {self.namespace}/{name}: the API server answered no object")
        return found

    def check_subsets(self, hosts: set[str], stable: str, canary: str) -> None:
        """Both subsets defined by the DestinationRule(s) of these hosts; MeshError naming what is missing."""
        if not hosts:
            return
        if self.destination_rule:
            rules = [self._get("destinationrules", self.destination_rule)]
        else:
            wanted = {name for host in hosts for name in (host, host.split(".")[0])}
            rules = []
            # A host `svc.ns[.svc.cluster.local]` has its DestinationRule in `ns`, usually.
            namespaces = sorted({_host_namespace(host, self.namespace) for host in hosts})
            for namespace in namespaces:
                try:
                    listed = self.api.list_namespaced_custom_object(
                        GROUP, self.version, namespace, "destinationrules"
                    )
                except ApiException as error:
                    where = f"destinationrules in {namespace}"
                    raise MeshError(f"cannot list {where}: {_api_message(error)}") from None
                items = listed.get("items", []) if isinstance(listed, dict) else []
                rules += [i for i in items if wanted & set(_names({"host": i.get("spec", {}).get("host")}))]
        if not rules:
            where = ", ".join(sorted({_host_namespace(host, self.namespace) for host in hosts}))
            raise MeshError(f"no DestinationRule in {where} for host(s) {', '.join(sorted(hosts))}")
        defined = {
            str(subset.get("name"))
            for rule in rules
            for subset in (rule.get("spec", {}).get("subsets") or [])
            if isinstance(subset, dict)
        }
        missing = [name for name in (stable, canary) if name not in defined]
        if missing:
            names = ", ".join(str(rule.get("metadata", {}).get("name")) for rule in rules)
            raise MeshError(f"DestinationRule {names} defines no subset {', '.join(missing)}")

    def apply_sync(self, stable: str, canary: str, weight: int) -> bool:
        """Write the weights; True if the object changed. Retries on 409, MeshError otherwise."""
        try:
            return self._apply_sync(stable, canary, weight)
        except (urllib3.exceptions.HTTPError, OSError) as error:  # the API server is unreachable
            raise MeshError(f"cannot reach the Kubernetes API server: {error}") from None

    def _apply_sync(self, stable: str, canary: str, weight: int) -> bool:
        if not 0 <= weight <= 100:
            raise MeshError(f"canary weight must be 0..100, not {weight}")
        for _ in range(self.max_conflicts + 1):
            current = self._get("virtualservices", self.virtual_service)
            updated, operations, hosts = plan(current, stable, canary, weight, self.route)
            self.check_subsets(hosts, stable, canary)
            if not operations:
                return False
            version = current.get("metadata", {}).get("resourceVersion")
            try:
                if self.write == "replace":
                    self.api.replace_namespaced_custom_object(
                        GROUP, self.version, self.namespace, "virtualservices", self.virtual_service, updated
                    )
                else:
                    # The resourceVersion in the patch makes the API server refuse a stale write (409).
                    guard = {"op": "replace", "path": "/metadata/resourceVersion", "value": version}
                    self.api.patch_namespaced_custom_object(
                        GROUP,
                        self.version,
                        self.namespace,
                        "virtualservices",
                        self.virtual_service,
                        [guard, *operations],
                        _content_type=JSON_PATCH,
                    )
            except ApiException as error:
                if error.status == 409:
                    self.conflicts += 1
                    log.info("VirtualService %s changed meanwhile (409): reading again", self.virtual_service)
                    continue
                where = f"VirtualService {self.namespace}/{self.virtual_service}"
                raise MeshError(f"cannot write {where}: {_api_message(error)}") from None
            self.writes += 1
            log.info(
                "VirtualService %s/%s: %s %d%%, %s %d%%",
                self.namespace, self.virtual_service, stable, 100 - weight, canary, weight,
            )  # fmt: skip
            return True
        raise MeshError(
            f"VirtualService {self.namespace}/{self.virtual_service}: still conflicting after "
            f"{self.max_conflicts} retries"
        )


def api_client(kubeconfig: str | None, context: str | None, in_cluster: bool) -> ApiClient:
    """A client from the pod's service account, or from a kubeconfig (default: ~/.kube/config)."""
    from kubernetes import client, config

    if in_cluster:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return ApiClient(configuration)
    loaded: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context
    )
    return loaded
