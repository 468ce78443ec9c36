"""A failure after the decision (a broken counter store) still gets a defined answer, not a gRPC error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.rpc import code_pb2
from prometheus_client import CollectorRegistry

from policy_engine.audit.metrics import Metrics
from policy_engine.decide.pipeline import Pipeline
from policy_engine.envoy.authz import AuthorizationService
from policy_engine.policy.compiler import load_bundle
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService
from policy_engine.quota.store import Admission, Demand
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"


class BrokenStore(MemoryStore):
    """A store with a bug (not an outage): admit raises something unexpected."""

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        raise RuntimeError("counter store bug")


def test_an_unexpected_store_error_is_a_500_decision() -> None:
    bundle = load_bundle(EXAMPLES)
    pipeline = Pipeline(bundle)
    metrics = Metrics(CollectorRegistry())
    snapshot = TelemetrySnapshot({name: BackendStats(name) for name in ("llama-8b-a", "llama-8b-b")})
    service = AuthorizationService(
        lambda: pipeline,
        lambda: snapshot,
        QuotaService(BrokenStore(), lambda: bundle, metrics),
        metrics,
        1 << 20,
    )
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/v1/chat/completions",
        headers={"authorization": "Bearer sk-hobby-free-key-0003", "content-type": "application/json"},
        body=json.dumps({"model": "llama-3-8b-instruct", "messages": [{"role": "user", "content": "hi"}]}),
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    response = asyncio.run(service.Check(request, None))  # type: ignore[arg-type]
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 500
    reasons = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert reasons["x-pe-reason"] == "internal_error"
    assert json.loads(response.denied_response.body)["error"]["code"] == "internal_error"
