"""envoy.service.auth.v3.Authorization: one decision per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

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
    ) -> None:
        self._pipeline = pipeline
        self._telemetry = telemetry
        self._quota = quota
        self._metrics = metrics
        self._max_body = max_body

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        attrs = attributes(request, self._max_body)
        decision: Decision = self._pipeline().decide(attrs, self._telemetry())
        decision = await self._quota.settle(decision)
        response = check_response(decision, attrs.headers.keys(), decision.dynamic_metadata)
        self._metrics.observe(decision, time.perf_counter() - start)
        if decision.errors:
            log.warning("decision %s errors: %s", attrs.id, "; ".join(decision.errors))
        return response
