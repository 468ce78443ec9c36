"""An immutable view of backend telemetry at one instant, read by every decision."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class BackendStats:
    name: str
    healthy: bool = True
    stale: bool = False
    age_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    error_rate: float = 0.0
    inflight: int = 0
    queue_depth: int = 0
    kv_cache_usage: float = 0.0
    rps: float = 0.0
    tokens_per_s: float = 0.0
    version: str = ""
    region: str = ""
    model: str = ""
    weight: int = 0
    capacity: int = 0  # concurrent requests the backend takes before queueing; 0 = unknown
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetrySnapshot:
    """Backends by name plus aggregates; `load` is given or derived from capacity."""

    backends: Mapping[str, BackendStats] = field(default_factory=lambda: MappingProxyType({}))
    load: float | None = None
    version: int = 0  # changes whenever the content does; lets consumers cache conversions

    def overall_load(self) -> float:
        if self.load is not None:
            return self.load
        capacity = sum(b.capacity for b in self.backends.values() if b.healthy and not b.stale)
        if capacity <= 0:
            return 0.0
        busy = sum(b.inflight + b.queue_depth for b in self.backends.values() if b.healthy and not b.stale)
        return busy / capacity


EMPTY_SNAPSHOT = TelemetrySnapshot()
