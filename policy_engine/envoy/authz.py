"""envoy.service.auth.v3.Authorization: one decision per request."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from policy_engine.audit.auditor import Auditor
from policy_engine.audit.decision_log import Timing
from policy_engine.audit.metrics import Metrics
from policy_engine.decide.attributes import RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.envoy.check import attributes, check_response
from policy_engine.log_throttle import LogThrottle
from policy_engine.quota.service import QuotaService
from policy_engine.telemetry.snapshot import TelemetrySnapshot

log = logging.getLogger("policy_engine.authz")


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        pipeline: Callable[[], Pipeline],
        telemetry: Callable[[], TelemetrySnapshot],
        quota: QuotaService,
        metrics: Metrics,
        max_body: int,
        auditor: Auditor | None = None,
        canary_weights: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._telemetry = telemetry
        self._quota = quota
        self._metrics = metrics
        self._max_body = max_body
        self._auditor = auditor
        self._canary_weights = canary_weights
        self._warn = LogThrottle(log)  # a policy failing at run time fails on every request

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        attrs = attributes(request, self._max_body)
        metadata = context.invocation_metadata() if self._auditor is not None else ()
        decision = await self.decide(attrs, metadata, start)
        try:
            return check_response(decision, attrs.headers.keys(), decision.dynamic_metadata)
        except Exception:  # a defined answer rather than a gRPC UNKNOWN
            log.exception("request %s: building the answer failed", attrs.id)
            failed = _internal_error(decision, "building the answer failed")
            return check_response(failed, attrs.headers.keys())

    async def decide(
        self, attrs: RequestAttributes, invocation_metadata: Any, start: float | None = None
    ) -> Decision:
        """The decision for one request, settled against the counters, counted and audited:
        what both transports (gRPC Check, HTTP ext_authz) answer from."""
        start = time.perf_counter() if start is None else start
        telemetry = self._telemetry()
        weights = self._canary_weights() if self._canary_weights is not None else None
        decision: Decision = self._pipeline().decide(
            attrs, telemetry, canary_weights=weights, store_settles=True
        )
        evaluated = time.perf_counter()
        try:
            decision = await self._quota.settle(decision)
        except Exception as error:  # a defined answer rather than a transport error
            log.exception("request %s: settling the decision failed", attrs.id)
            decision = _internal_error(decision, f"{type(error).__name__}: {error}")
        elapsed = time.perf_counter() - start
        self._metrics.observe(decision, elapsed)
        if decision.errors:
            rule = decision.errors[0].partition(":")[0]  # policy/rule: one line per interval each
            self._warn.warning(rule, "decision %s errors: %s", attrs.id, "; ".join(decision.errors))
        if self._auditor is not None:
            # The wall-clock start, derived rather than read on every call when audit is off.
            timing = Timing(time.time_ns() - int(elapsed * 1e9), elapsed, evaluated - start)
            self._auditor.record(invocation_metadata, attrs, decision, telemetry, timing)
        return decision


def _internal_error(decision: Decision, error: str) -> Decision:
    return dataclasses.replace(
        decision,
        allowed=False,
        status=500,
        reason="internal_error",
        message="the policy decision failed",
        errors=(*decision.errors, error),
        dynamic_metadata={},
    )
