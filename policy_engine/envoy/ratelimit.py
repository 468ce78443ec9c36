"""envoy.service.ratelimit.v3.RateLimitService: token usage charged after the response.

Quotas are checked and charged in the ext_authz Check call (one gRPC call per request). An
Envoy configured with `charging="rate_limit"` (`envoy-config --charging rate-limit`, the chart's
`istio.tokenCharging=rateLimit`) calls this service only at the end of a stream, with the usage
the backend reported as `hits_addend` and, in the descriptor, the counters and reservations that
Check returned as dynamic metadata; by default the gateway charges from its access log instead
(policy_engine.envoy.usage_charge). Descriptors this
service does not know are answered OK.
"""

from __future__ import annotations

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from policy_engine.decide.quota import METADATA_KEYS
from policy_engine.quota.service import QuotaService, UsageReport

DESCRIPTOR_KEYS = {key: kind for kind, key in METADATA_KEYS.items()}
# Envoy sends one descriptor per configured action (a handful); more is not a real proxy.
MAX_DESCRIPTORS = 64
MAX_HITS = 1 << 32  # usage beyond this per response is not a real model answer


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, quota: QuotaService) -> None:
        self._quota = quota

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: object
    ) -> rls_pb2.RateLimitResponse:
        statuses = []
        reports: list[UsageReport] = []
        for index, descriptor in enumerate(request.descriptors):
            if index >= MAX_DESCRIPTORS:
                # Answered OK without charging: the usage still counts in the descriptors before.
                statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=rls_pb2.RateLimitResponse.OK))
                continue
            hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else request.hits_addend
            hits = min(hits, MAX_HITS)
            for entry in descriptor.entries:
                kind = DESCRIPTOR_KEYS.get(entry.key)
                if kind is not None and hits > 0:
                    reports.append((entry.value, int(hits), kind))
            statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=rls_pb2.RateLimitResponse.OK))
        if reports:
            await self._quota.charge_reports(reports)
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK, statuses=statuses)
