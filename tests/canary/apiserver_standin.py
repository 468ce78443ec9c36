"""A STAND-IN for the Kubernetes API server (none can run on this machine), on loopback.

It honours the parts of the API contract the mesh executor relies on, for Istio's
virtualservices and destinationrules in any namespace:

* GET an object or a collection; POST (create, 409 if it exists); PUT (replace);
  PATCH as `application/merge-patch+json` (the body must be a JSON object) or
  `application/json-patch+json` (RFC 6902: add, replace, remove, test);
* `metadata.resourceVersion`: a counter bumped on every write; a PUT or patch carrying another
  version than the stored one is refused with 409 Conflict, a PUT without one with 422;
* every written VirtualService / DestinationRule is validated against Istio's CRD schema
  (`policy_engine.mesh.crds`); errors come back as 422 with the schema messages;
* a JSON-patch list sent as a merge patch is refused with 422, as the real server does.

Answers are `Status` objects like the real server's. `requests` records (method, path,
content type) so tests can check what the client sent.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policy_engine.mesh.crds import CrdSchemas

_PATH = re.compile(
    r"^/apis/networking\.istio\.io/(?P<version>v1|v1beta1|v1alpha3)/namespaces/(?P<ns>[^/]+)/"
    r"(?P<plural>virtualservices|destinationrules)(?:/(?P<name>[^/?]+))?(?:\?.*)?$"
)
_KINDS = {"virtualservices": "VirtualService", "destinationrules": "DestinationRule"}


class PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(document: Any, operations: list[Any]) -> Any:
    result = copy.deepcopy(document)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid operation {op!r}")
        parts = _pointer(op["path"])
        parent: Any = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key: Any = int(last) if isinstance(parent, list) and last != "-" else last
        if op["op"] == "test":
            if parent[key] != op.get("value"):
                raise PatchError(f"test failed at {op['path']}")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list) and op["op"] == "add":
                parent.insert(len(parent) if key == "-" else key, op["value"])
            else:
                if op["op"] == "replace" and (key not in parent if isinstance(parent, dict) else False):
                    raise PatchError(f"replace of missing {op['path']}")
                parent[key] = op["value"]
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise PatchError(f"unsupported op {op['op']}")
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ApiServerStandIn:
    """The stand-in server; `objects[(namespace, plural, name)]` is its storage."""

    def __init__(self, crds: CrdSchemas) -> None:
        self.crds = crds
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.version = 100
        self.lock = threading.Lock()
        # Called before a write is applied (a test uses it to slip in a concurrent change).
        self.before_write: Any = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ApiServerStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def put_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object directly (test setup), validated like any write."""
        errors = self.crds.validate(obj)
        if errors:
            raise ValueError("; ".join(errors))
        plural = next(p for p, k in _KINDS.items() if k == obj["kind"])
        with self.lock:
            return self._store(obj["metadata"]["namespace"], plural, obj["metadata"]["name"], obj)

    def _store(self, ns: str, plural: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(ns, plural, name)] = stored
        return copy.deepcopy(stored)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._answer(
                    code,
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                     "reason": reason, "code": code},
                )  # fmt: skip

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _route(self) -> re.Match[str] | None:
                stand_in.requests.append(
                    (self.command, self.path, self.headers.get("Content-Type", "").split(";")[0])
                )
                found = _PATH.match(self.path)
                if found is None:
                    self._status(404, "NotFound", f"the server could not find {self.path}")
                return found

            def do_GET(self) -> None:
                found = self._route()
                if found is None:
                    return
                ns, plural, name = found["ns"], found["plural"], found["name"]
                with stand_in.lock:
                    if name is None:
                        stored = stand_in.objects.items()
                        items = [copy.deepcopy(o) for (n, p, _), o in stored if (n, p) == (ns, plural)]
                        listing = {
                            "kind": _KINDS[plural] + "List",
                            "apiVersion": "networking.istio.io/v1",
                            "metadata": {"resourceVersion": str(stand_in.version)},
                            "items": items,
                        }
                        self._answer(200, listing)
                        return
                    obj = stand_in.objects.get((ns, plural, name))
                if obj is None:
                    self._status(404, "NotFound", f'{plural}.networking.istio.io "{name}" not found')
                else:
                    self._answer(200, copy.deepcopy(obj))

            def _write(self, ns: str, plural: str, name: str, new: Any, expected: str | None) -> None:
                if not isinstance(new, dict):
                    self._status(422, "Invalid", "the object is not a JSON object")
                    return
                errors = stand_in.crds.validate(new)
                if errors:
                    kind = _KINDS[plural]
                    invalid = f'{kind}.networking.istio.io "{name}" is invalid: '
                    self._status(422, "Invalid", invalid + "; ".join(errors))
                    return
                if stand_in.before_write is not None:
                    hook, stand_in.before_write = stand_in.before_write, None
                    hook()
                with stand_in.lock:
                    current = stand_in.objects.get((ns, plural, name))
                    if current is None:
                        self._status(404, "NotFound", f'{plural}.networking.istio.io "{name}" not found')
                        return
                    if expected is not None and expected != current["metadata"]["resourceVersion"]:
                        self._status(
                            409, "Conflict",
                            f'Operation cannot be fulfilled on {plural}.networking.istio.io "{name}": the '
                            "object has been modified; please apply your changes to the latest version and "
                            "try again",
                        )  # fmt: skip
                        return
                    self._answer(200, stand_in._store(ns, plural, name, new))

            def do_POST(self) -> None:
                found = self._route()
                if found is None:
                    return
                body = self._body()
                name = (body.get("metadata") or {}).get("name", "") if isinstance(body, dict) else ""
                errors = stand_in.crds.validate(body) if isinstance(body, dict) else ["not an object"]
                if errors:
                    self._status(422, "Invalid", "; ".join(errors))
                    return
                with stand_in.lock:
                    if (found["ns"], found["plural"], name) in stand_in.objects:
                        self._status(409, "AlreadyExists", f'"{name}" already exists')
                        return
                    self._answer(201, stand_in._store(found["ns"], found["plural"], name, body))

            def do_PUT(self) -> None:
                found = self._route()
                if found is None:
                    return
                body = self._body()
                metadata = (body.get("metadata") or {}) if isinstance(body, dict) else {}
                version = metadata.get("resourceVersion")
                if not version:
                    message = "metadata.resourceVersion: Invalid value: must be specified for an update"
                    self._status(422, "Invalid", message)
                    return
                self._write(found["ns"], found["plural"], found["name"], body, version)

            def do_PATCH(self) -> None:
                found = self._route()
                if found is None:
                    return
                ns, plural, name = found["ns"], found["plural"], found["name"]
                content_type = self.headers.get("Content-Type", "").split(";")[0]
                body = self._body()
                with stand_in.lock:
                    current = copy.deepcopy(stand_in.objects.get((ns, plural, name)))
                if current is None:
                    self._status(404, "NotFound", f'{plural}.networking.istio.io "{name}" not found')
                    return
                if content_type == "application/merge-patch+json":
                    if not isinstance(body, dict):
                        # What the real server answers when a JSON-patch list arrives as a merge patch.
                        message = "error decoding patch: cannot unmarshal array into a merge patch object"
                        self._status(422, "Invalid", message)
                        return
                    new = merge_patch(current, body)
                elif content_type == "application/json-patch+json":
                    try:
                        new = json_patch(current, body)
                    except (PatchError, KeyError, IndexError, TypeError, ValueError) as error:
                        self._status(422, "Invalid", f"the JSON patch could not be applied: {error}")
                        return
                else:
                    message = f"the body of the request was in an unknown format: {content_type}"
                    self._status(415, "UnsupportedMediaType", message)
                    return
                sent_version = new.get("metadata", {}).get("resourceVersion")
                stale = sent_version if sent_version != current["metadata"]["resourceVersion"] else None
                self._write(ns, plural, name, new, stale or current["metadata"]["resourceVersion"])

        return Handler
