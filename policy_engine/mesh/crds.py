"""Validate Istio resources the way the Kubernetes API server would, from Istio's CRD file.

Each served CRD version's `openAPIV3Schema` becomes a JSON Schema: `nullable` allows null,
`x-kubernetes-int-or-string` allows an integer or a string, and an object that lists `properties`
rejects unknown fields unless it has `x-kubernetes-preserve-unknown-fields` (structural pruning
would drop them silently on a real cluster, which hides mistakes). The CRDs' CEL rules
(`x-kubernetes-validations`) run through the project's CEL engine with `self` as dyn. Like the API
server on create, transition rules (those reading `oldSelf`) are not evaluated. CEL runs only on an
object that passed the schema, so a type error is reported once, not again as a rule failure.

The CRD file is reference data and not part of the project: `find_crd_file` looks for it in
`$PE_ISTIO_CRDS`, next to the repository, then in the shared checkout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from policy_engine.cel.engine import (
    CelCompileError,
    CelEvalError,
    Environment,
    FunctionDef,
    Overload,
    Program,
)
from policy_engine.cel.schema import Variable

CRD_FILE_NAME = "crd-all.gen-1.30.3.yaml"
CRD_PATH_ENV = "PE_ISTIO_CRDS"

# Rules the engine cannot compile, with the reason; anything else that fails to compile is an error.
UNSUPPORTED_RULES: Mapping[str, str] = {}

_OLD_SELF = re.compile(r"\boldSelf\b")
# url.ParseRequestURI, which Kubernetes' isURL() uses: an absolute URI or an absolute path, no blanks.
_REQUEST_URI = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:|/)[^\s\x00-\x1f\x7f]*$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class CrdFileNotFoundError(FileNotFoundError):
    """The Istio CRD file is in none of the places searched."""


def candidate_paths() -> list[Path]:
    """Where the CRD file is looked for, in order."""
    paths: list[Path] = []
    if os.environ.get(CRD_PATH_ENV):
        paths.append(Path(os.environ[CRD_PATH_ENV]))
    repo = Path(__file__).resolve().parents[2]
    paths.append(repo.parent / "shared" / "istio" / CRD_FILE_NAME)
    paths.append(Path("/work/shared/istio") / CRD_FILE_NAME)
    return paths


def find_crd_file() -> Path:
    named = os.environ.get(CRD_PATH_ENV)
    if named and not Path(named).is_file():
        # Named but missing: never fall back to another file than the one asked for.
        raise CrdFileNotFoundError(f"{CRD_PATH_ENV} names {named}, which is not a file")
    paths = candidate_paths()
    for path in paths:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in paths)
    raise CrdFileNotFoundError(
        f"Istio CRD file {CRD_FILE_NAME} not found (searched: {searched}); download Istio's "
        f"manifests/charts/base/files/crd-all.gen.yaml for 1.30.3 and set {CRD_PATH_ENV} to its path"
    )


def _is_url(text: str) -> bool:
    return _REQUEST_URI.match(text) is not None


def _url(text: str) -> str:
    if not _is_url(text):
        raise ValueError(f"URL parse error during conversion from string: {text!r}")
    return text


def _scheme(url: str) -> str:
    return urlsplit(url).scheme


# Kubernetes' URL library, as far as Istio's rules use it. A URL is kept as its (checked) string:
# the rules only ever call getScheme() on it, so a dedicated type would add nothing.
_URL_FUNCTIONS = (
    FunctionDef("isURL", (Overload("k8s_is_url", ("string",), "bool", _is_url),), "Kubernetes isURL()."),
    FunctionDef("url", (Overload("k8s_url", ("string",), "string", _url),), "Kubernetes url()."),
    FunctionDef(
        "getScheme",
        (Overload("k8s_url_get_scheme", ("string",), "string", _scheme, member=True),),
        "Kubernetes URL.getScheme().",
    ),
)


def rule_environment() -> Environment:
    """The CEL environment of a CRD validation rule: `self` (and `oldSelf`) as dyn."""
    variables = (
        Variable("self", "dyn", "The value the rule is attached to."),
        Variable("oldSelf", "dyn", "The previous value (transition rules only)."),
    )
    return Environment(_URL_FUNCTIONS, variables)


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """An `openAPIV3Schema` node as a JSON Schema that rejects unknown fields."""
    out: dict[str, Any] = {}
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, Mapping)):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(child) for child in value]
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable"):
            out["anyOf"].append({"type": "null"})
    elif node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not preserve and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _path(parts: Iterator[str | int] | list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


@dataclass
class CrdVersion:
    group: str
    version: str
    kind: str
    schema: dict[str, Any]  # the openAPIV3Schema as written (CEL rules, list types)
    validator: jsonschema.protocols.Validator


@dataclass
class CrdSchemas:
    """The served versions of a set of CRDs, by (group, version, kind)."""

    versions: dict[tuple[str, str, str], CrdVersion]
    source: Path
    _env: Environment = field(default_factory=rule_environment, repr=False)
    _programs: dict[str, Program | CelCompileError] = field(default_factory=dict, repr=False)

    def kinds(self) -> list[str]:
        return sorted(f"{g}/{v} {k}" for g, v, k in self.versions)

    def rules(self) -> list[str]:
        """Every CEL rule of every served version, once each."""
        found: set[str] = set()
        for crd in self.versions.values():
            _collect_rules(crd.schema, found)
        return sorted(found)

    def compile_rule(self, rule: str) -> Program | CelCompileError:
        if rule not in self._programs:
            try:
                self._programs[rule] = self._env.compile(rule)
            except CelCompileError as error:
                self._programs[rule] = error
        return self._programs[rule]

    def validate(self, obj: Mapping[str, Any]) -> list[str]:
        """Errors, each naming the JSON path of the offending value; an empty list means valid."""
        if not isinstance(obj, Mapping):
            return [f"(root): expected a mapping, got {type(obj).__name__}"]
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or "/" not in api_version:
            return [f"apiVersion: expected GROUP/VERSION, got {api_version!r}"]
        group, version = api_version.split("/", 1)
        crd = self.versions.get((group, version, str(kind)))
        if crd is None:
            served = [f"{g}/{v}" for g, v, k in self.versions if k == kind]
            hint = f" (served: {', '.join(sorted(served))})" if served else ""
            return [f"kind: no CRD serves {api_version} {kind}{hint}"]
        errors = _metadata_errors(obj.get("metadata"))
        schema_errors = sorted(
            crd.validator.iter_errors(dict(obj)), key=lambda e: [str(p) for p in e.absolute_path]
        )
        errors += [f"{_path(list(e.absolute_path))}: {e.message}" for e in schema_errors]
        if not schema_errors:
            errors += self._rule_errors(crd.schema, obj, [])
        return errors

    def _rule_errors(self, node: Mapping[str, Any], value: Any, path: list[str | int]) -> list[str]:
        if value is None:
            return []
        errors: list[str] = []
        for entry in node.get("x-kubernetes-validations", []):
            errors += self._check_rule(entry, value, path)
        errors += _list_type_errors(node, value, path)
        if isinstance(value, Mapping):
            properties = node.get("properties", {})
            extra = node.get("additionalProperties")
            for key, child in value.items():
                if key in properties:
                    errors += self._rule_errors(properties[key], child, [*path, key])
                elif isinstance(extra, Mapping):
                    errors += self._rule_errors(extra, child, [*path, key])
        elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
            for index, item in enumerate(value):
                errors += self._rule_errors(node["items"], item, [*path, index])
        return errors

    def _check_rule(self, entry: Mapping[str, Any], value: Any, path: list[str | int]) -> list[str]:
        rule = str(entry["rule"])
        if _OLD_SELF.search(rule):
            return []  # a transition rule: the API server skips it on create
        where = _path(path)
        program = self.compile_rule(rule)
        if isinstance(program, CelCompileError):
            if rule in UNSUPPORTED_RULES:
                return []
            return [f"{where}: rule {rule!r} does not compile: {program.message}"]
        try:
            result = program.eval(self._env.activation({"self": value}))
        except CelEvalError as error:
            return [f"{where}: rule {rule!r} failed to evaluate: {error}"]
        if result is True:
            return []
        message = entry.get("message") or f"failed rule: {rule}"
        return [f"{where}: {message}"]


def _collect_rules(node: Any, found: set[str]) -> None:
    if isinstance(node, Mapping):
        for entry in node.get("x-kubernetes-validations", []):
            found.add(str(entry["rule"]))
        for child in node.values():
            _collect_rules(child, found)
    elif isinstance(node, list):
        for child in node:
            _collect_rules(child, found)


def _metadata_errors(metadata: Any) -> list[str]:
    """The part of ObjectMeta a manifest author controls: a valid name, string labels and annotations."""
    if not isinstance(metadata, Mapping):
        return ["metadata: required mapping is missing"]
    errors: list[str] = []
    name = metadata.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS subdomain (lower case, digits, '-', '.')")
    for key in ("labels", "annotations"):
        entries = metadata.get(key)
        if entries is None:
            continue
        if not isinstance(entries, Mapping) or not all(isinstance(v, str) for v in entries.values()):
            errors.append(f"metadata.{key}: expected a mapping of strings")
    return errors


def _list_type_errors(node: Mapping[str, Any], value: Any, path: list[str | int]) -> list[str]:
    list_type = node.get("x-kubernetes-list-type")
    if not isinstance(value, list) or list_type not in ("set", "map"):
        return []
    keys = node.get("x-kubernetes-list-map-keys", [])
    seen: list[Any] = []
    errors: list[str] = []
    for index, item in enumerate(value):
        identity = item if list_type == "set" else [item.get(k) for k in keys]
        if identity in seen:
            errors.append(f"{_path([*path, index])}: duplicate entry {identity!r} (list type {list_type})")
        seen.append(identity)
    return errors


def load_crds(path: Path | None = None) -> CrdSchemas:
    """Load every served version of every CRD in the file (by default the one `find_crd_file` finds)."""
    source = path if path is not None else find_crd_file()
    if not source.is_file():
        raise CrdFileNotFoundError(f"Istio CRD file not found: {source}")
    versions: dict[tuple[str, str, str], CrdVersion] = {}
    with source.open(encoding="utf-8") as stream:
        for document in yaml.safe_load_all(stream):
            if not isinstance(document, Mapping) or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for entry in spec["versions"]:
                if not entry.get("served", False):
                    continue
                schema = entry["schema"]["openAPIV3Schema"]
                json_schema = to_json_schema(schema)
                # apiVersion, kind and metadata are the API server's business, checked in validate().
                envelope = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}}
                json_schema.setdefault("properties", {}).update(envelope, metadata={"type": "object"})
                versions[(group, entry["name"], kind)] = CrdVersion(
                    group, entry["name"], kind, schema, jsonschema.Draft202012Validator(json_schema)
                )
    if not versions:
        raise ValueError(f"{source}: no CustomResourceDefinition with a served version")
    return CrdSchemas(versions, source)
