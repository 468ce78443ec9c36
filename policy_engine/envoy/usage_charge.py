"""Token usage charged from Envoy's access-log stream, the gateway's default charging path.

Envoy already streams one access-log entry per request to the service (live telemetry), in
batches. With `GatewayConfig.charging="access_log"` each entry also carries what the rate-limit
call would have: the counters and reservations the decision returned as ext_authz dynamic
metadata, and the usage the backend reported (`policy_engine.usage`). Charging from the entry
saves a gRPC call per request, the service's dearest part after the decision itself
(docs/BENCHMARKS.md); a charge lands within one flush interval of the response.

Only entries whose dynamic metadata carries `policy_engine.charge: {via: access_log}` (the
gateway's set_metadata filter, in the bootstrap and in the mesh's EnvoyFilter alike) are
charged: an Envoy that charges through the rate-limit service has no such filter, and its
entries must not be charged a second time. As on the rate-limit path, a response without usage
(an aborted stream, a stream without `include_usage`) charges nothing and keeps its reservation.
A reported 0 is charged (it returns the reservation), and so is a request that never reached a
backend (no healthy one, a refused connection: no tokens can have been spent), which the
rate-limit path cannot do: there a `hits_addend` of 0 means "check only".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2

from policy_engine.decide.quota import METADATA_KEYS
from policy_engine.envoy.bootstrap import (
    AUTHZ_NAMESPACE,
    CHARGE_KEY,
    CHARGE_NAMESPACE,
    CHARGE_VALUE,
    USAGE_FIELDS,
)
from policy_engine.envoy.ratelimit import MAX_HITS
from policy_engine.quota.service import UsageReport
from policy_engine.telemetry.access_log import USAGE_NAMESPACE, reported_usage

_FINAL_TYPES = frozenset({accesslog_pb2.AccessLogType.NotSet, accesslog_pb2.AccessLogType.DownstreamEnd})


def usage_charges(common: Any) -> list[UsageReport]:
    """(counters JSON, tokens, kind) for each token kind an access-log entry's
    `AccessLogCommon` asks to charge; none unless the entry is marked for charging."""
    if not marked(common):
        return []
    namespaces = common.metadata.filter_metadata
    # One charge per request: only its final downstream entry, never a periodic or an
    # upstream one (should the logger ever be configured to send those too).
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
        return []
    if AUTHZ_NAMESPACE not in namespaces:
        return []
    counters = namespaces[AUTHZ_NAMESPACE].fields
    reserved = {
        kind: counters[key].string_value
        for kind, key in METADATA_KEYS.items()
        if key in counters and counters[key].WhichOneof("kind") == "string_value"
    }
    if USAGE_NAMESPACE not in namespaces:
        # Nothing reported: if nothing can have been spent either, every reservation comes back.
        return [(entries, 0, kind) for kind, entries in reserved.items()] if never_reached(common) else []
    usage = reported_usage(namespaces[USAGE_NAMESPACE].fields)
    # A reported 0 is usage too (a filtered or empty answer): it returns the reservation.
    return [
        (entries, int(min(usage[USAGE_FIELDS[kind]], MAX_HITS)), kind)
        for kind, entries in reserved.items()
        if USAGE_FIELDS[kind] in usage
    ]


# The access-log custom tag that marked entries for charging before the mark moved into dynamic
# metadata: a gateway still running a bootstrap generated then keeps being charged while it is
# upgraded. To be dropped after the next release.
LEGACY_CHARGE_TAG = ("pe_charge", "access_log")


def marked(common: Any) -> bool:
    """Whether the entry asks to be charged: the gateway's mark, or the earlier tag."""
    namespaces = common.metadata.filter_metadata
    if CHARGE_NAMESPACE in namespaces:
        mark = namespaces[CHARGE_NAMESPACE].fields.get(CHARGE_KEY)
        return mark is not None and mark.string_value == CHARGE_VALUE
    tag, value = LEGACY_CHARGE_TAG
    return bool(common.custom_tags.get(tag) == value)


def never_reached(common: Any) -> bool:
    """Whether the request never reached a backend: no byte of it went upstream (no backend
    healthy or reachable, no route, the client gone during the decision, a local answer). After
    several attempts the last one's timing may be all there is, so retries never count.

    Relies on Envoy recording the first upstream byte as the request headers go out, into the
    downstream entry's timing; it does in the Envoy this project pins (1.40; since about 1.22,
    earlier versions copied upstream timing only when the upstream finished)."""
    return (
        not common.HasField("time_to_first_upstream_tx_byte") and common.upstream_request_attempt_count <= 1
    )


class UsageCharger:
    """Charges the usage access-log entries report; `charge` is what AccessLogService calls."""

    def __init__(self, charge_reports: Callable[[Sequence[UsageReport]], Awaitable[int]]) -> None:
        self._charge_reports = charge_reports

    async def charge(self, commons: Sequence[Any]) -> int:
        """Counters charged for some entries' `AccessLogCommon`s, in one call to the store."""
        reports = [report for common in commons for report in usage_charges(common)]
        return await self._charge_reports(reports) if reports else 0
