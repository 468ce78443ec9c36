"""`policy-engine mesh-config …`: the Istio side of the deployment, generated and checked."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from policy_engine.envoy.bootstrap import GatewayConfig
from policy_engine.envoy.options import CHARGING_HELP, USAGE_HELP, Charging, UsageReader, combination_warning
from policy_engine.mesh.crds import CRD_PATH_ENV, CrdFileNotFoundError, load_crds
from policy_engine.mesh.envoyfilter import CONTEXTS, PATCH_FILES, MeshTarget, envoy_filter, patches_file
from policy_engine.mesh.providers import ServiceAddress, mesh_config, providers_file, validate_mesh_config

mesh_app = typer.Typer(
    help="Istio integration: the EnvoyFilter, the mesh config entries, the chart's generated files, "
    "and validation of manifests against Istio's CRDs.",
    no_args_is_help=True,
)
# Without markup: messages quote files and user input, where "[x]" is text.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

CHART_FILES: dict[str, Callable[[], str]] = {
    **{name: partial(patches_file, charging) for name, charging in PATCH_FILES.values()},
    "extension-providers.json": providers_file,
}


def _address(text: str, option: str) -> ServiceAddress:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        err.print(f"{option} must be HOST:PORT, not {text!r}")
        raise typer.Exit(2)
    return ServiceAddress(host, int(port))


@mesh_app.command("chart-files")
def chart_files(
    chart: Annotated[Path, typer.Option(help="The chart directory.")] = Path("charts/policy-engine"),
    check: Annotated[bool, typer.Option(help="Fail if the files differ instead of writing them.")] = False,
) -> None:
    """Write the chart's files/*.json (EnvoyFilter patches, extension providers) from the Envoy builders."""
    stale = []
    for name, render in CHART_FILES.items():
        path = chart / "files" / name
        text = render()
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        if check:
            stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        out.print(f"wrote {path}")
    if stale:
        err.print(f"out of date (run `policy-engine mesh-config chart-files`): {', '.join(stale)}")
        raise typer.Exit(1)


@mesh_app.command("envoyfilter")
def envoyfilter_command(
    service: Annotated[str, typer.Option(help="HOST:PORT of the service's gRPC port in the mesh.")] = (
        "policy-engine.policy-engine.svc.cluster.local:9001"
    ),
    namespace: Annotated[str, typer.Option(help="Namespace of the EnvoyFilter (the gateway's).")] = (
        "istio-system"
    ),
    name: Annotated[str, typer.Option(help="Name of the EnvoyFilter.")] = "policy-engine",
    selector: Annotated[
        list[str] | None, typer.Option("--selector", help="LABEL=VALUE of the gateway pods (repeat).")
    ] = None,
    context: Annotated[str, typer.Option(help=f"Patch context: {', '.join(CONTEXTS)}.")] = "GATEWAY",
    charging: Annotated[
        Charging,
        typer.Option(
            help=CHARGING_HELP + " Charging from the access log needs the gateway's access log "
            "sent to the service (the Telemetry resource of mesh/ or of the chart)."
        ),
    ] = Charging.access_log,
    usage_extraction: Annotated[
        UsageReader,
        typer.Option(help=USAGE_HELP + " An Istio proxy without these filters rejects the whole listener."),
    ] = UsageReader.lua,
) -> None:
    """Print the EnvoyFilter: token charging, usage extraction, route cache clearing."""
    labels = []
    for item in selector if selector is not None else ["istio=ingressgateway"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err.print(f"--selector must be LABEL=VALUE, not {item!r}")
            raise typer.Exit(2)
        labels.append((key, value))
    address = _address(service, "--service")
    target = MeshTarget(name, namespace, tuple(labels), context, address.host, int(address.port))
    try:
        config = GatewayConfig(charging=charging.config, usage_extraction=usage_extraction.config)
        resource = envoy_filter(target, config)
        if (warning := combination_warning(config)) is not None:
            err.print(f"warning: {warning}")
    except ValueError as error:
        err.print(str(error))
        raise typer.Exit(2) from None
    sys.stdout.write(yaml.safe_dump(resource, sort_keys=False))


@mesh_app.command("providers")
def providers_command(
    service: Annotated[str, typer.Option(help="HOST:PORT of the service's gRPC port in the mesh.")] = (
        "policy-engine.policy-engine.svc.cluster.local:9001"
    ),
    otlp: Annotated[
        str | None, typer.Option(help="HOST:PORT of an OTLP/gRPC collector for Envoy's spans.")
    ] = None,
) -> None:
    """Print the meshConfig.extensionProviders entries to merge into istiod's values."""
    collector = _address(otlp, "--otlp") if otlp else None
    sys.stdout.write(yaml.safe_dump(mesh_config(_address(service, "--service"), collector), sort_keys=False))


def _documents(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as stream:
        for index, document in enumerate(yaml.safe_load_all(stream), start=1):
            if document is not None:
                yield index, document


@mesh_app.command("validate")
def validate_command(
    files: Annotated[list[Path], typer.Argument(help="YAML files of Istio resources or mesh config.")],
) -> None:
    """Validate Istio resources against Istio's CRD schemas and CEL rules (and mesh config snippets).

    The CRD file (Istio 1.30.3 crd-all.gen.yaml) is read from $PE_ISTIO_CRDS or ../shared/istio/.
    """
    try:
        crds = load_crds()
    except CrdFileNotFoundError as error:
        err.print(f"{error} (${CRD_PATH_ENV})")
        raise typer.Exit(2) from None
    failures = 0
    for path in files:
        try:
            documents = list(_documents(path))
        except (OSError, yaml.YAMLError) as error:
            err.print(f"{path}: {error}")
            failures += 1
            continue
        for index, document in documents:
            is_mesh_config = isinstance(document, dict) and "meshConfig" in document
            errors = validate_mesh_config(document) if is_mesh_config else crds.validate(document)
            what = "meshConfig" if is_mesh_config else _describe(document)
            for message in errors:
                out.print(f"{path}: document {index} ({what}): {message}")
            failures += bool(errors)
    if failures:
        raise typer.Exit(1)
    out.print(f"{len(files)} file(s) valid")


def _describe(document: Any) -> str:
    if not isinstance(document, dict):
        return "not a mapping"
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{document.get('kind')}/{name}"
