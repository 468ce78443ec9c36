"""The command-line spellings of the gateway's choices, shared by `envoy-config` and
`mesh-config envoyfilter`."""

from __future__ import annotations

import enum

from policy_engine.envoy.bootstrap import ChargingPath

CHARGING_HELP = (
    "How the usage is charged after the response: from the access-log stream the service "
    "receives anyway (no call per request), or by one rate-limit call per response."
)


class UsageReader(enum.StrEnum):
    lua = "lua"
    native = "native"


class Charging(enum.StrEnum):
    access_log = "access-log"
    rate_limit = "rate-limit"

    @property
    def config(self) -> ChargingPath:
        """The `GatewayConfig.charging` value."""
        return "rate_limit" if self is Charging.rate_limit else "access_log"
