"""The local executor: the weights this process's pipeline applies through the canary header.

The pipeline assigns each eligible request to the canary when its sticky bucket falls below the
weight, and the routing stage (or the VirtualService) routes on the header it sets. Applying a
weight is therefore just replacing the mapping `Pipeline.decide(canary_weights=...)` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

from policy_engine.canary.state import RolloutState, revision
from policy_engine.canary.store import RolloutStore, StoreError
from policy_engine.log_throttle import LogThrottle
from policy_engine.policy import bundle as b

log = logging.getLogger("policy_engine.canary")


def rollout_policies(bundle: b.Bundle) -> tuple[b.CanaryPolicy, ...]:
    return tuple(policy for policy in bundle.canary if policy.rollout is not None)


def policy_revision(policy: b.CanaryPolicy) -> str:
    assert policy.rollout is not None
    return revision(policy.stable, policy.canary, policy.rollout.steps)


def current_states(bundle: b.Bundle, states: Mapping[str, RolloutState]) -> dict[str, RolloutState]:
    """The stored states that belong to the bundle's rollouts as they are now (same revision)."""
    current: dict[str, RolloutState] = {}
    for policy in rollout_policies(bundle):
        state = states.get(policy.name)
        if state is not None and state.revision == policy_revision(policy):
            current[policy.name] = state
    return current


class LocalExecutor:
    def __init__(self) -> None:
        self._weights: Mapping[str, int] = MappingProxyType({})

    def weights(self) -> Mapping[str, int]:
        """The mapping for `Pipeline.decide`; replaced, never mutated, so a reader sees one version."""
        return self._weights

    async def apply(self, policy: b.CanaryPolicy, weight: int) -> None:
        if self._weights.get(policy.name) != weight:
            self._weights = MappingProxyType({**self._weights, policy.name: weight})

    def replace(self, weights: Mapping[str, int]) -> None:
        if dict(self._weights) != dict(weights):
            self._weights = MappingProxyType(dict(weights))


async def follow(
    store: RolloutStore,
    bundle: Callable[[], b.Bundle],
    executor: LocalExecutor,
    stop: asyncio.Event,
    period_s: float,
    on_states: Callable[[Mapping[str, RolloutState]], None] | None = None,
) -> None:
    """Apply the stored weights every `period_s`: how every worker agrees with the controller."""
    warn = LogThrottle(log)  # a store outage fails every period
    while not stop.is_set():
        current = bundle()
        names = [policy.name for policy in rollout_policies(current)]
        if names:
            try:
                states = current_states(current, await store.load_many(names))
            except StoreError as error:
                warn.warning("refresh", "canary weights not refreshed: %s", error)
            else:
                executor.replace({name: state.weight for name, state in states.items()})
                if on_states is not None:
                    on_states(states)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
