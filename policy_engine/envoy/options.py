"""The command-line spellings of the gateway's choices, shared by `envoy-config` and
`mesh-config envoyfilter`."""

from __future__ import annotations

import enum

from policy_engine.envoy.bootstrap import ChargingPath, GatewayConfig, UsageExtraction

CHARGING_HELP = (
    "How the usage is charged after the response: from the access-log stream the service "
    "receives anyway (no call per request), or by one rate-limit call per response."
)


USAGE_HELP = (
    "How Envoy reads the backend's token usage: 'lua' scans answers of any size as they pass; "
    "'native' (Envoy's json_to_metadata and sse_to_metadata, Envoy 1.38+) costs Envoy less CPU "
    "but fails JSON answers over its 1 MiB buffer with 500."
)


class UsageReader(enum.StrEnum):
    lua = "lua"
    native = "native"

    @property
    def config(self) -> UsageExtraction:
        """The `GatewayConfig.usage_extraction` value."""
        return "native" if self is UsageReader.native else "lua"


class Charging(enum.StrEnum):
    access_log = "access-log"
    rate_limit = "rate-limit"

    @property
    def config(self) -> ChargingPath:
        """The `GatewayConfig.charging` value."""
        return "rate_limit" if self is Charging.rate_limit else "access_log"


def combination_warning(config: GatewayConfig) -> str | None:
    """What a gateway charging through the rate-limit service with Envoy's native usage readers
    gets wrong: the rate-limit charge reads the metadata as Envoy wrote it, and Envoy's filters
    cannot add; only the service, charging from the access log, completes what they store."""
    if config.usage_extraction == "native" and config.charging == "rate_limit":
        return (
            "with --usage-extraction native, --charging rate-limit charges an Anthropic-style "
            "prompt without its cached tokens, and no total where the backend reports none (the "
            "reservation stays); --usage-extraction lua has neither gap"
        )
    return None
