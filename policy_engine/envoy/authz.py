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
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.envoy.check import attributes, check_response
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

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        attrs = attributes(request, self._max_body)
        telemetry = self._telemetry()
        weights = self._canary_weights() if self._canary_weights is not None else None
        decision: Decision = self._pipeline().decide(attrs, telemetry, canary_weights=weights)
        evaluated = time.perf_counter()
        try:
            decision = await self._quota.settle(decision)
            response = check_response(decision, attrs.headers.keys(), decision.dynamic_metadata)
        except Exception as error:  # a defined answer rather than a gRPC UNKNOWN
            log.exception("request %s: settling the decision failed", attrs.id)
            decision = dataclasses.replace(
                decision,
                allowed=False,
                status=500,
                reason="internal_error",
                message="the policy decision failed",
                errors=(*decision.errors, f"{type(error).__name__}: {error}"),
                dynamic_metadata={},
            )
            response = check_response(decision, attrs.headers.keys())
        elapsed = time.perf_counter() - start
        self._metrics.observe(decision, elapsed)
        if decision.errors:
            log.warning("decision %s errors: %s", attrs.id, "; ".join(decision.errors))
        if self._auditor is not None:
            # The wall-clock start, derived rather than read on every call when audit is off.
            timing = Timing(time.time_ns() - int(elapsed * 1e9), elapsed, evaluated - start)
            self._auditor.record(context.invocation_metadata(), attrs, decision, telemetry, timing)
        return response
