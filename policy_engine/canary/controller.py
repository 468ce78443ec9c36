"""The rollout controller: every tick, each rollout's traffic → the machine → the store → the executor.

One controller runs per store (in the serving process: worker 0 only; or `policy-engine canary
run`). It takes manual commands the CLI left in the store, logs every transition as one JSON
line and records it as an OpenTelemetry span. Telemetry that cannot be read counts as no
traffic, so a rollout without data becomes explicitly inconclusive instead of stalling.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace

from policy_engine.canary.analysis import analyser
from policy_engine.canary.local import policy_revision, rollout_policies
from policy_engine.canary.machine import UNAVAILABLE, Outcome, Reading, RolloutSpec, advance, start
from policy_engine.canary.state import HISTORY_LIMIT, Command, Counts, RolloutState, Transition
from policy_engine.canary.store import RolloutStore, StoreError
from policy_engine.canary.telemetry import Observation, TelemetryError, TelemetrySource
from policy_engine.decide.activation import MessageBuilder
from policy_engine.log_throttle import LogThrottle
from policy_engine.policy import bundle as b

log = logging.getLogger("policy_engine.canary")
Clock = Callable[[], float]


class ExecutorError(Exception):
    """The executor could not apply a weight; the controller retries on its next tick."""


class Executor(Protocol):
    async def apply(self, policy: b.CanaryPolicy, weight: int) -> None: ...


class CanaryController:
    def __init__(
        self,
        bundle: Callable[[], b.Bundle],
        source: TelemetrySource,
        store: RolloutStore,
        executor: Executor,
        *,
        clock: Clock = time.time,
        on_state: Callable[[RolloutState], None] | None = None,
    ) -> None:
        self._bundle = bundle
        self._source = source
        self._store = store
        self._executor = executor
        self._clock = clock
        self._on_state = on_state
        self._messages = MessageBuilder()
        self._tracer = trace.get_tracer("policy_engine.canary")
        self._owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._leading: bool | None = None
        self._warn = LogThrottle(log)  # a store or telemetry outage fails every tick

    async def _lead(self) -> bool:
        """Whether this controller drives the rollouts (one per shared store) for the next ticks."""
        try:
            leading = await self._store.lease(self._owner, ttl_s=max(5.0, 4 * self.period()))
        except StoreError as error:
            self._warn.warning(
                "lease", "canary controller: cannot take the lease, skipping this tick: %s", error
            )
            return False
        if leading != self._leading:
            log.info("canary controller %s %s", self._owner, "leads" if leading else "follows another")
            self._leading = leading
        return leading

    async def tick(self) -> dict[str, RolloutState]:
        """One pass over every rollout; the states after it (policies whose store failed are left out)."""
        bundle = self._bundle()
        states: dict[str, RolloutState] = {}
        if not rollout_policies(bundle) or not await self._lead():
            return states
        for policy in rollout_policies(bundle):
            try:
                state = await self._tick_policy(bundle, policy)
            except StoreError as error:
                self._warn.warning(
                    f"store {policy.name}",
                    "canary %s: state store unavailable, retrying next tick: %s",
                    policy.name,
                    error,
                )
                continue
            states[policy.name] = state
            try:
                await self._executor.apply(policy, state.weight)
            except ExecutorError as error:
                log.error("canary %s: weight %d%% not applied: %s", policy.name, state.weight, error)
            if self._on_state is not None:
                self._on_state(state)
        return states

    async def _observe(self, policy: b.CanaryPolicy, previous: RolloutState | None) -> Observation:
        try:
            return await self._source.observe(policy.stable, policy.canary)
        except TelemetryError as error:
            self._warn.warning(
                f"telemetry {policy.name}",
                "canary %s: no telemetry this tick (counted as no traffic): %s",
                policy.name,
                error,
            )
            if previous is not None:
                return Observation(Reading(previous.source, previous.seen), None, None)
            return Observation(Reading(UNAVAILABLE, Counts()), None, None)

    async def _tick_policy(self, bundle: b.Bundle, policy: b.CanaryPolicy) -> RolloutState:
        assert policy.rollout is not None
        spec = RolloutSpec.of(policy.rollout)
        now = self._clock()
        state = await self._store.load(policy.name)
        command = await self._store.take_command(policy.name)
        try:
            return await self._apply(bundle, policy, spec, now, state, command)
        except BaseException:
            if command is not None:  # the CLI said it will be applied: keep it for the next tick
                with contextlib.suppress(StoreError):
                    await self._store.request(policy.name, command)
            raise

    async def _apply(
        self,
        bundle: b.Bundle,
        policy: b.CanaryPolicy,
        spec: RolloutSpec,
        now: float,
        state: RolloutState | None,
        command: Command | None,
    ) -> RolloutState:
        observation = await self._observe(policy, state)
        events: tuple[Transition, ...] = ()
        if state is None or state.revision != policy_revision(policy):
            started = start(policy.name, policy_revision(policy), spec, observation.reading, now)
            if state is not None:  # the policy changed: a new rollout, the old history kept
                history = (*state.history, *started.state.history)[-HISTORY_LIMIT:]
                started = Outcome(dataclasses.replace(started.state, history=history), started.events)
            events, state, previous = started.events, started.state, None
        else:
            previous = state
        env = bundle.analysis_env
        if env is None:
            raise RuntimeError("the bundle was compiled without an analysis environment")
        at = datetime.fromtimestamp(now, UTC)
        analyse = analyser(policy, env, observation.stable, observation.canary, at, self._messages)
        outcome = advance(state, spec, observation.reading, now, analyse, command)
        events += outcome.events
        if outcome.state != previous:
            await self._store.save(outcome.state)
        for event in events:
            self._report(event)
        return outcome.state

    def _report(self, event: Transition) -> None:
        log.info("canary transition %s", json.dumps(event.to_dict(), sort_keys=True))
        attributes = {f"canary.{key}": value for key, value in event.to_dict().items()}
        with self._tracer.start_as_current_span("canary.transition", attributes=attributes):
            pass

    async def run(self, stop: asyncio.Event, period_s: float | None = None) -> None:
        """Tick until `stop` is set; a tick that fails unexpectedly is logged, never fatal."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("canary controller tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s or self.period())

    def period(self) -> float:
        """A quarter of the shortest interval (bounded): boundaries are seen within that much."""
        intervals = [p.rollout.interval for p in rollout_policies(self._bundle()) if p.rollout is not None]
        return min(max(min(intervals, default=4.0) / 4.0, 0.1), 1.0)
