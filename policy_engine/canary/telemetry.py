"""Where the controller reads the stable's and the canary's traffic from.

* `HubSource`: the serving process's own telemetry hub (fed by Envoy's access-log stream).
* `MetricsPageSource`: a running decision service's Prometheus page, for `policy-engine canary
  run` outside the service: the `pe_telemetry_backend_*` gauges and the request/error counters.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, fields
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from policy_engine.canary.machine import Reading
from policy_engine.canary.state import Counts
from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.snapshot import BackendStats


class TelemetryError(Exception):
    pass


@dataclass(frozen=True)
class Observation:
    reading: Reading
    stable: BackendStats | None
    canary: BackendStats | None


class TelemetrySource(Protocol):
    async def observe(self, stable: str, canary: str) -> Observation: ...


class HubSource:
    def __init__(self, hub: TelemetryHub) -> None:
        self._hub = hub
        # Counters of a hub start at zero with the process: a new id tells the machine so.
        self._source = f"hub-{uuid.uuid4().hex[:12]}"

    async def observe(self, stable: str, canary: str) -> Observation:
        snapshot = self._hub.snapshot()
        stable_status, canary_status = self._hub.status(stable), self._hub.status(canary)
        counts = Counts(
            canary_requests=canary_status.requests_total if canary_status else 0,
            canary_errors=canary_status.errors_total if canary_status else 0,
            stable_requests=stable_status.requests_total if stable_status else 0,
            stable_errors=stable_status.errors_total if stable_status else 0,
        )
        return Observation(
            Reading(self._source, counts), snapshot.backends.get(stable), snapshot.backends.get(canary)
        )


_GAUGE = "pe_telemetry_backend_"
_FLOAT_FIELDS = {f.name for f in fields(BackendStats) if f.type in ("float", "int", "bool")}


def parse_page(text: str) -> tuple[dict[str, BackendStats], dict[str, tuple[int, int]]]:
    """A decision service's metrics page → per-backend statistics and (requests, errors) totals."""
    values: dict[str, dict[str, float]] = {}
    totals: dict[str, list[int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            backend = sample.labels.get("backend")
            if backend is None or not sample.name.startswith(_GAUGE):
                continue
            name = sample.name[len(_GAUGE) :]
            if name in ("requests_total", "errors_total"):
                totals.setdefault(backend, [0, 0])[name == "errors_total"] = int(sample.value)
            elif name in _FLOAT_FIELDS:
                values.setdefault(backend, {})[name] = float(sample.value)
    stats: dict[str, BackendStats] = {}
    for backend, known in values.items():
        kwargs: dict[str, object] = {}
        for spec in fields(BackendStats):
            if spec.name not in known:
                continue
            value = known[spec.name]
            if spec.type == "bool":
                kwargs[spec.name] = value >= 1.0
            elif spec.type == "int":
                kwargs[spec.name] = int(value) if math.isfinite(value) else 0
            else:
                kwargs[spec.name] = value
        stats[backend] = BackendStats(backend, **kwargs)  # type: ignore[arg-type]
    return stats, {b: (t[0], t[1]) for b, t in totals.items()}


class MetricsPageSource:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self._timeout = timeout_s

    async def _page(self) -> str:
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.get(self.url)
        except httpx.HTTPError as error:
            raise TelemetryError(f"cannot read telemetry from {self.url}: {error}") from None
        if response.status_code != 200:
            raise TelemetryError(f"telemetry page {self.url} answered {response.status_code}")
        return response.text

    async def observe(self, stable: str, canary: str) -> Observation:
        try:
            stats, totals = parse_page(await self._page())
        except ValueError as error:
            raise TelemetryError(f"telemetry page {self.url} is not a Prometheus page: {error}") from None
        if stable not in totals or canary not in totals:
            missing = [name for name in (stable, canary) if name not in totals]
            raise TelemetryError(f"telemetry page {self.url} has no counters for {', '.join(missing)}")
        stable_total, canary_total = totals[stable], totals[canary]
        counts = Counts(canary_total[0], canary_total[1], stable_total[0], stable_total[1])
        # A restarted service resets its counters; the machine notices the drop.
        return Observation(Reading(self.url, counts), stats.get(stable), stats.get(canary))
