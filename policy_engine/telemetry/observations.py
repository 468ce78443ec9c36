"""What the telemetry sources report to the hub: one finished request, or one metrics scrape."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestObservation:
    """One request Envoy sent (or tried to send) to a backend, as its access log describes it."""

    backend: str
    status: int  # HTTP status; 0 when no response came back (e.g. the client gave up first)
    latency_ms: float | None = None  # time spent on the upstream; None when there was none
    ttft_ms: float | None = None  # time to the first upstream byte: a TTFT proxy for streams
    connect_failure: bool = False  # the backend could not be reached (or reset the connection)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @property
    def failed(self) -> bool:
        return self.connect_failure or self.status >= 500

    @property
    def succeeded(self) -> bool:
        """The backend answered with something other than a server error."""
        return not self.connect_failure and 0 < self.status < 500

    @property
    def tokens(self) -> int:
        return self.total_tokens or self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ScrapeSample:
    """One successful scrape of a backend's /metrics; None where the backend does not export it."""

    running: float | None = None  # vllm:num_requests_running
    waiting: float | None = None  # vllm:num_requests_waiting
    kv_cache_usage: float | None = None  # vllm:kv_cache_usage_perc, 0..1
    # vllm:time_to_first_token_seconds as cumulative (upper bound in seconds, count), ascending.
    ttft_buckets: tuple[tuple[float, float], ...] | None = None
