"""`policy-engine canary …`: rollout status, manual promote/abort/restart, and the mesh executor."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from policy_engine.canary.state import Command, RolloutState
from policy_engine.canary.store import RolloutStore, StoreError, open_store

canary_app = typer.Typer(
    help="Canary rollouts: see their state, promote or abort one by hand (the running controller "
    "applies it on its next tick), or run the mesh executor that writes VirtualService weights.",
    no_args_is_help=True,
)
# Without markup: messages quote files and user input, where "[x]" is text.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
T = TypeVar("T")

StateOption = Annotated[
    Path,
    typer.Option(
        "--state", envvar="PE_CANARY_STATE", help="Rollout state file, used when there is no --redis-url."
    ),
]
RedisOption = Annotated[
    str | None,
    typer.Option("--redis-url", envvar="PE_REDIS_URL", help="Rollout states in Redis (as `serve` uses)."),
]
ClusterOption = Annotated[
    bool,
    typer.Option(
        "--redis-cluster", envvar="PE_REDIS_CLUSTER", help="--redis-url names a node of a Redis Cluster."
    ),
]
DEFAULT_STATE = Path(".policy-engine/canary-state.json")


def _open_store(redis_url: str | None, state: Path, redis_cluster: bool) -> RolloutStore:
    try:
        return open_store(redis_url, state, cluster=redis_cluster)
    except StoreError as error:
        err.print(str(error))
        raise typer.Exit(1) from None


def _run(store: RolloutStore, action: Callable[[RolloutStore], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except StoreError as error:
        err.print(f"canary state: {error}")
        raise typer.Exit(1) from None


def _age(at: float) -> str:
    return f"{max(time.time() - at, 0.0):.0f}s ago" if at else "-"


@canary_app.command()
def status(
    state: StateOption = DEFAULT_STATE,
    redis_url: RedisOption = None,
    redis_cluster: ClusterOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="States as JSON.")] = False,
) -> None:
    """Table of rollouts: phase, step, weight, the step's requests and the last analysis."""
    store = _open_store(redis_url, state, redis_cluster)
    states = _run(store, lambda s: s.load_all())
    if json_output:
        out.print_json(json.dumps({name: json.loads(s.to_json()) for name, s in states.items()}))
        return
    if not states:
        out.print(f"no rollouts in {store.describe()}")
        return
    table = Table(title=f"rollouts in {store.describe()}")
    columns = ("policy", "phase", "step", "weight", "canary req", "stable req", "step since", "last analysis")
    for column in columns:
        table.add_column(column, overflow="fold")
    for name, rollout in sorted(states.items()):
        table.add_row(
            name,
            rollout.phase,
            str(rollout.step + 1),
            f"{rollout.weight}%",
            f"{rollout.window.canary_requests} ({rollout.window.canary_errors} err)",
            f"{rollout.window.stable_requests} ({rollout.window.stable_errors} err)",
            _age(rollout.step_started_at),
            rollout.last_analysis,
        )
    out.print(table)


def _command(policy: str, command: Command, state: Path, redis_url: str | None, redis_cluster: bool) -> None:
    store = _open_store(redis_url, state, redis_cluster)

    async def send(s: RolloutStore) -> RolloutState | None:
        found = await s.load(policy)
        if found is not None:
            await s.request(policy, command)
        return found

    found = _run(store, send)
    if found is None:
        err.print(f"no rollout named {policy!r} in {store.describe()} (see `policy-engine canary status`)")
        raise typer.Exit(1)
    now = f"now {found.phase} at {found.weight}%"
    out.print(f"{command} requested for {policy} ({now}); the controller applies it on its next tick")


@canary_app.command()
def promote(
    policy: Annotated[str, typer.Argument(help="CanaryPolicy name.")],
    state: StateOption = DEFAULT_STATE,
    redis_url: RedisOption = None,
    redis_cluster: ClusterOption = False,
) -> None:
    """Send all eligible traffic to the canary and end the rollout as promoted."""
    _command(policy, "promote", state, redis_url, redis_cluster)


@canary_app.command()
def abort(
    policy: Annotated[str, typer.Argument(help="CanaryPolicy name.")],
    state: StateOption = DEFAULT_STATE,
    redis_url: RedisOption = None,
    redis_cluster: ClusterOption = False,
) -> None:
    """Send all traffic back to stable and end the rollout as aborted."""
    _command(policy, "abort", state, redis_url, redis_cluster)


@canary_app.command()
def restart(
    policy: Annotated[str, typer.Argument(help="CanaryPolicy name.")],
    state: StateOption = DEFAULT_STATE,
    redis_url: RedisOption = None,
    redis_cluster: ClusterOption = False,
) -> None:
    """Start the rollout again at its first step (e.g. after fixing a rolled-back canary)."""
    _command(policy, "restart", state, redis_url, redis_cluster)


@canary_app.command()
def run(
    namespace: Annotated[str, typer.Option(help="Namespace of the VirtualService.")],
    virtual_service: Annotated[str, typer.Option(help="VirtualService whose route weights are written.")],
    telemetry_url: Annotated[
        str,
        typer.Option(help="Prometheus page of a running `policy-engine serve` (its backend telemetry)."),
    ],
    policies: Annotated[Path, typer.Option("--policies", "-p", help="Policy directory.")] = Path("policies"),
    route: Annotated[
        str | None, typer.Option(help="Only the http route with this name (default: every matching route).")
    ] = None,
    destination_rule: Annotated[
        str | None, typer.Option(help="DestinationRule with the subsets (default: found by host).")
    ] = None,
    write: Annotated[
        str, typer.Option(help="replace (PUT the object) or patch (JSON patch of the weights).")
    ] = "replace",
    api_version: Annotated[str, typer.Option(help="networking.istio.io version.")] = "v1",
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
    ] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context.")] = None,
    in_cluster: Annotated[bool, typer.Option("--in-cluster", help="Use the pod's service account.")] = False,
    state: StateOption = DEFAULT_STATE,
    redis_url: RedisOption = None,
    redis_cluster: ClusterOption = False,
    once: Annotated[bool, typer.Option("--once", help="One tick, then exit (cron jobs, checks).")] = False,
) -> None:
    """Run the rollout controller with the mesh executor: weights go into the VirtualService.

    Only one controller may drive a rollout: start `serve` with --no-canary-controller on the same store.
    """
    from policy_engine.canary.controller import CanaryController
    from policy_engine.canary.mesh import MeshExecutor, api_client
    from policy_engine.canary.telemetry import MetricsPageSource
    from policy_engine.policy.compiler import BundleError, load_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if write not in ("replace", "patch"):
        err.print(f"--write must be replace or patch, not {write!r}")
        raise typer.Exit(2)
    mode: Literal["replace", "patch"] = "patch" if write == "patch" else "replace"
    try:
        bundle = load_bundle(policies, deciding=False)
    except BundleError as error:
        for issue in error.issues:
            err.print(f"error {issue}")
        raise typer.Exit(1) from None
    if not any(p.rollout is not None for p in bundle.canary):
        err.print(f"no CanaryPolicy with a rollout in {policies}")
        raise typer.Exit(1)
    try:
        client = api_client(kubeconfig, context, in_cluster)
    except Exception as error:  # the kubernetes loaders raise several unrelated types
        err.print(f"cannot configure the Kubernetes client: {error}")
        raise typer.Exit(1) from None
    from kubernetes.client import CustomObjectsApi

    executor = MeshExecutor(
        CustomObjectsApi(client),
        namespace,
        virtual_service,
        route=route,
        destination_rule=destination_rule,
        write=mode,
        version=api_version,
    )
    store = _open_store(redis_url, state, redis_cluster)
    controller = CanaryController(lambda: bundle, MetricsPageSource(telemetry_url), store, executor)

    async def main(s: RolloutStore) -> None:
        if once:
            for name, rollout in (await controller.tick()).items():
                line = f"{name}: {rollout.phase} at {rollout.weight}% ({rollout.last_analysis})"
                out.print(line)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await controller.run(stop)

    _run(store, main)
    client.close()  # type: ignore[no-untyped-call]
