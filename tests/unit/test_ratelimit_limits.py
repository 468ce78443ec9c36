"""Limits of the rate-limit service: descriptors per call and usage per descriptor are bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from prometheus_client import CollectorRegistry

from policy_engine.audit.metrics import Metrics
from policy_engine.envoy.ratelimit import MAX_DESCRIPTORS, MAX_HITS, RateLimitService
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService, UsageReport


class RecordingQuota(QuotaService):
    """The real quota service, recording what it is asked to charge."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(), lambda: None, Metrics(CollectorRegistry()))  # type: ignore[arg-type, return-value]
        self.charged: list[tuple[str, int, str]] = []
        self.calls = 0

    async def charge_reports(self, reports: Sequence[UsageReport]) -> int:
        self.calls += 1
        self.charged.extend(reports)
        return 0


def request(descriptors: int, hits: int) -> rls_pb2.RateLimitRequest:
    message = rls_pb2.RateLimitRequest(domain="policy-engine")
    for index in range(descriptors):
        descriptor = ratelimit_pb2.RateLimitDescriptor()
        descriptor.entries.add(key="pe_total_tokens", value=f"[{index}]")
        descriptor.hits_addend.value = hits
        message.descriptors.append(descriptor)
    return message


def test_descriptors_past_the_limit_are_answered_but_not_charged() -> None:
    quota = RecordingQuota()
    response = asyncio.run(RateLimitService(quota).ShouldRateLimit(request(MAX_DESCRIPTORS + 36, 5), None))
    assert len(response.statuses) == MAX_DESCRIPTORS + 36
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    assert [entry for entry, _, _ in quota.charged] == [f"[{i}]" for i in range(MAX_DESCRIPTORS)]
    assert quota.calls == 1  # one request's descriptors, charged together


def test_usage_per_descriptor_is_clamped() -> None:
    quota = RecordingQuota()
    asyncio.run(RateLimitService(quota).ShouldRateLimit(request(1, 2**64 - 1), None))
    assert quota.charged == [("[0]", MAX_HITS, "total_tokens")]
