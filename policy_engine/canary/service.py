"""The canary part of a serving process: the weights its decisions use, and (worker 0) the controller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from policy_engine.canary.controller import CanaryController
from policy_engine.canary.local import LocalExecutor, follow
from policy_engine.canary.metrics import CanaryMetrics
from policy_engine.canary.store import RolloutStore, open_store
from policy_engine.canary.telemetry import HubSource
from policy_engine.config import Settings
from policy_engine.policy import bundle as b
from policy_engine.telemetry.hub import TelemetryHub


@dataclass
class CanaryService:
    store: RolloutStore
    executor: LocalExecutor
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def weights(self) -> Mapping[str, int]:
        return self.executor.weights()

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()


def start_canary(
    settings: Settings,
    worker: int,
    bundle: Callable[[], b.Bundle],
    hub: TelemetryHub,
    registry: CollectorRegistry,
) -> CanaryService:
    """Every worker follows the stored weights; worker 0 also runs the controller that sets them.

    Nothing touches the store while the bundle has no rollout, so no state file appears.
    """
    store = open_store(settings.redis_url, settings.canary_state, cluster=settings.redis_cluster)
    service = CanaryService(store, LocalExecutor())
    metrics = CanaryMetrics(registry)
    service.tasks.append(
        asyncio.create_task(
            follow(store, bundle, service.executor, service.stop, settings.canary_refresh_s, metrics.update)
        )
    )
    if worker == 0 and settings.canary_controller:
        controller = CanaryController(bundle, HubSource(hub), store, service.executor, on_state=metrics.set)
        service.tasks.append(asyncio.create_task(controller.run(service.stop)))
    return service
