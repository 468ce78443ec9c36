"""The live telemetry hub: observations in, cheap immutable snapshots out.

Sources (the access-log stream, the metrics scraper) call `observe` / `observe_scrape`; every
decision calls `snapshot()`. A snapshot is rebuilt at most every `refresh_s` (or on
`snapshot(force=True)`) and, when the rebuilt content equals the previous one, the previous
object is returned again: consumers cache conversions by snapshot identity, so identity changes
only with content, and `version` changes with it.

Rules (times in seconds of the hub's clock):

* **Fresh data** is an access-log entry with an answer from the backend (any status; a refused
  connection counts too, a request abandoned before any answer does not) or a successful scrape of
  its /metrics. `age_s` is the time since the latest; after `stale_after_s` without any, the
  backend is `stale`. A backend never heard from is stale with `age_s = inf`. A failed scrape is
  not fresh data; it changes nothing else. Without a scrape target, an idle backend goes stale
  too: there is no way to tell idle from gone, so configure scraping for backends that must stay
  routable without traffic, or declare them `passive` (never stale; health from failures only).
* **Health** (passive ejection, in the spirit of Envoy's outlier detection): a failure is a 5xx
  answer or a connect failure; a success is any other answer from the backend (a response that
  never came, status 0, counts as neither). After `eject_after` consecutive failures the backend
  is unhealthy for `ejection_s`, doubled on each further ejection without an intervening success
  (capped at `max_ejection_s`). A success ends the ejection and resets the count. When the
  ejection expires the backend is healthy again but keeps its count, so the next failure ejects
  it at once (half-open). A successful scrape ends an ejection only if the last failure was a
  connect failure: it proves the backend is reachable again, whereas a backend answering 500 to
  every request usually still serves /metrics and would otherwise flap every scrape interval.
* **Scraped gauges** (inflight, queue depth, KV-cache use) keep their last scraped value. Without
  any successful scrape, `inflight` is estimated from access logs by Little's law
  (requests/s * mean latency) and `queue_depth` is 0.
* **Load** is set when at least one usable (healthy, not stale) backend has a known capacity:
  Σ(inflight + queue) / Σ capacity over those backends; otherwise None, and
  `TelemetrySnapshot.overall_load()` derives what it can.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policy_engine.telemetry.observations import RequestObservation, ScrapeSample
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot
from policy_engine.telemetry.stats import RollingStats

Clock = Callable[[], float]


@dataclass(frozen=True)
class BackendSpec:
    """A configured backend and its static attributes (copied into every snapshot)."""

    name: str
    version: str = ""
    region: str = ""
    model: str = ""
    weight: int = 0
    capacity: int = 0  # concurrent requests before queueing; 0 = unknown
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_url: str | None = None  # Prometheus endpoint the scraper reads, if any
    # Never marked stale: for backends with no scrape target on purpose (static setups), whose
    # health then comes from the access log's failure ejection alone.
    passive: bool = False


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """Diagnostics of one backend beyond what the snapshot carries (for metrics and debugging)."""

    name: str
    last_request_age_s: float | None
    last_scrape_age_s: float | None
    last_scrape_error: str
    scrape_failures: int  # consecutive
    consecutive_failures: int
    ejected_for_s: float  # remaining ejection; 0 when healthy
    ejections: int
    # Cumulative since this hub started (the canary controller judges a step on their growth).
    requests_total: int = 0
    errors_total: int = 0


class _Backend:
    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "errors_total",
        "labels",
        "last_failure_connect",
        "last_request_at",
        "last_scrape_at",
        "last_scrape_error",
        "requests_total",
        "scrape",
        "scrape_failures",
        "spec",
        "stats",
        "ttft_cumulative",
    )

    def __init__(self, spec: BackendSpec, half_life_s: float, now: float) -> None:
        self.spec = spec
        self.labels: Mapping[str, str] = MappingProxyType(dict(spec.labels))
        self.stats = RollingStats(half_life_s, now)
        self.last_request_at: float | None = None
        self.last_scrape_at: float | None = None
        self.last_scrape_error = ""
        self.scrape_failures = 0
        self.scrape: ScrapeSample | None = None
        self.ttft_cumulative: tuple[tuple[float, float], ...] | None = None
        self.consecutive_failures = 0
        self.last_failure_connect = False
        self.ejected_until = -math.inf
        self.ejections = 0
        self.requests_total = 0
        self.errors_total = 0

    def last_fresh(self) -> float | None:
        times = [t for t in (self.last_request_at, self.last_scrape_at) if t is not None]
        return max(times) if times else None


def _spec(backend: BackendSpec | str) -> BackendSpec:
    return backend if isinstance(backend, BackendSpec) else BackendSpec(backend)


def _bucket_deltas(
    previous: tuple[tuple[float, float], ...], current: tuple[tuple[float, float], ...]
) -> list[tuple[float, float, float]]:
    """New observations between two cumulative histograms as (low_ms, high_ms, count)."""
    if [b for b, _ in previous] != [b for b, _ in current]:
        return []  # the layout changed: nothing comparable, start over from this scrape
    if any(new < old for (_, new), (_, old) in zip(current, previous, strict=True)):
        previous = tuple((b, 0.0) for b, _ in current)  # counters reset: the backend restarted
    deltas: list[tuple[float, float, float]] = []
    low = 0.0
    before_new = before_old = 0.0
    for (bound, new), (_, old) in zip(current, previous, strict=True):
        # Clamped: a scrape is not atomic, so adjacent buckets may disagree by a request.
        count = max((new - before_new) - (old - before_old), 0.0)
        if count > 0:
            deltas.append((low * 1000.0, bound * 1000.0, count))
        before_new, before_old, low = new, old, bound
    return deltas


def _round(value: float | None, digits: int) -> float:
    return round(value, digits) if value is not None else 0.0


class TelemetryHub:
    """Per-backend live state and the snapshot every decision reads. Thread-safe."""

    def __init__(
        self,
        backends: Iterable[BackendSpec | str] = (),
        *,
        clock: Clock = time.monotonic,
        refresh_s: float = 0.25,
        stale_after_s: float = 5.0,
        half_life_s: float = 10.0,
        eject_after: int = 5,
        ejection_s: float = 10.0,
        max_ejection_s: float = 300.0,
    ) -> None:
        self._clock = clock
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.half_life_s = half_life_s
        self.eject_after = eject_after
        self.ejection_s = ejection_s
        self.max_ejection_s = max_ejection_s
        self._lock = threading.Lock()
        self._backends: dict[str, _Backend] = {}
        self._snapshot = TelemetrySnapshot()
        self._built_at = -math.inf
        self._version = 0
        self.unknown_observations = 0  # entries for backends the hub does not know
        self.configure(backends)

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def backends(self) -> tuple[BackendSpec, ...]:
        return tuple(state.spec for state in self._backends.values())

    def knows(self, name: str) -> bool:
        return name in self._backends

    def configure(self, backends: Iterable[BackendSpec | str]) -> None:
        """Replace the configured backends; those that stay keep their live state."""
        specs = [_spec(b) for b in backends]
        now = self._clock()
        with self._lock:
            previous = self._backends
            fresh: dict[str, _Backend] = {}
            for spec in specs:
                state = previous.get(spec.name)
                if state is None:
                    state = _Backend(spec, self.half_life_s, now)
                elif state.spec != spec:
                    state.spec = spec
                    state.labels = MappingProxyType(dict(spec.labels))
                fresh[spec.name] = state
            self._backends = fresh
            self._built_at = -math.inf  # the next snapshot shows the new set

    # -- observations -------------------------------------------------------------------------

    def observe(self, observation: RequestObservation) -> bool:
        """Record one finished request; False (and ignored) if the backend is not configured."""
        now = self._clock()
        with self._lock:
            state = self._backends.get(observation.backend)
            if state is None:
                self.unknown_observations += 1
                return False
            answered = observation.status != 0 or observation.connect_failure
            if answered:
                # Only an answer (or a refused connection) says something about the backend now:
                # a request the client gave up on must not keep a hung backend looking fresh.
                state.last_request_at = now
                state.requests_total += 1
                state.errors_total += observation.failed
            # Unanswered, it still counts in the request rate and its latency (the client's
            # patience: the backend took at least that long), but not in the error rate.
            state.stats.record(
                now,
                latency_ms=observation.latency_ms,
                ttft_ms=observation.ttft_ms,
                error=observation.failed,
                tokens=observation.tokens,
                answered=answered,
            )
            if observation.failed:
                self._failure(state, observation.connect_failure, now)
            elif observation.succeeded:
                state.consecutive_failures = 0
                state.ejections = 0
                state.ejected_until = -math.inf
            return True

    def _failure(self, state: _Backend, connect: bool, now: float) -> None:
        state.consecutive_failures += 1
        state.last_failure_connect = connect
        if state.consecutive_failures >= self.eject_after and now >= state.ejected_until:
            duration = min(self.ejection_s * 2.0 ** min(state.ejections, 30), self.max_ejection_s)
            state.ejected_until = now + duration
            state.ejections += 1

    def observe_scrape(self, name: str, sample: ScrapeSample) -> bool:
        """Record a successful scrape; False (and ignored) if the backend is not configured."""
        now = self._clock()
        with self._lock:
            state = self._backends.get(name)
            if state is None:
                return False
            state.last_scrape_at = now
            state.scrape_failures = 0
            state.last_scrape_error = ""
            state.scrape = sample
            if sample.ttft_buckets is not None:
                previous, state.ttft_cumulative = state.ttft_cumulative, sample.ttft_buckets
                # The first scrape is only a baseline: its counts are the backend's whole history.
                if previous is not None:
                    state.stats.record_ttft_buckets(now, _bucket_deltas(previous, sample.ttft_buckets))
            if state.last_failure_connect and now < state.ejected_until:
                state.ejected_until = now
            return True

    def scrape_failed(self, name: str, reason: str) -> bool:
        """Record a failed scrape: only diagnostics change; staleness follows from the absence."""
        with self._lock:
            state = self._backends.get(name)
            if state is None:
                return False
            state.scrape_failures += 1
            state.last_scrape_error = reason
            return True

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self, force: bool = False) -> TelemetrySnapshot:
        """The current snapshot; the same object until `refresh_s` passed and content changed."""
        now = self._clock()
        if not force and now - self._built_at < self.refresh_s:
            return self._snapshot
        with self._lock:
            if force or now - self._built_at >= self.refresh_s:
                self._rebuild(now)
            return self._snapshot

    def _rebuild(self, now: float) -> None:
        backends = {name: self._stats(state, now) for name, state in self._backends.items()}
        load = self._load(backends.values())
        current = self._snapshot
        self._built_at = now
        if dict(current.backends) == backends and current.load == load and self._version > 0:
            return
        self._version += 1
        self._snapshot = TelemetrySnapshot(MappingProxyType(backends), load, self._version)

    def _stats(self, state: _Backend, now: float) -> BackendStats:
        spec = state.spec
        summary = state.stats.summary(now)
        last = state.last_fresh()
        age = now - last if last is not None else math.inf
        scrape = state.scrape
        if scrape is not None and scrape.running is not None:
            inflight = round(scrape.running)
        else:
            mean_s = (summary.latency_mean_ms or 0.0) / 1000.0
            inflight = round(summary.rps * mean_s)  # Little's law over the decayed window
        return BackendStats(
            name=spec.name,
            healthy=now >= state.ejected_until,
            stale=age > self.stale_after_s and not spec.passive,
            age_s=round(age, 3) if math.isfinite(age) else age,
            latency_p50_ms=_round(summary.latency_p50_ms, 3),
            latency_p99_ms=_round(summary.latency_p99_ms, 3),
            ttft_p99_ms=_round(summary.ttft_p99_ms, 3),
            error_rate=_round(summary.error_rate, 4),
            inflight=inflight,
            queue_depth=round(scrape.waiting) if scrape is not None and scrape.waiting is not None else 0,
            kv_cache_usage=_round(scrape.kv_cache_usage if scrape is not None else None, 4),
            rps=_round(summary.rps, 3),
            tokens_per_s=_round(summary.tokens_per_s, 3),
            version=spec.version,
            region=spec.region,
            model=spec.model,
            weight=spec.weight,
            capacity=spec.capacity,
            labels=state.labels,
        )

    @staticmethod
    def _load(backends: Iterable[BackendStats]) -> float | None:
        known = [b for b in backends if b.healthy and not b.stale and b.capacity > 0]
        if not known:
            return None
        return round(sum(b.inflight + b.queue_depth for b in known) / sum(b.capacity for b in known), 4)

    def status(self, name: str) -> BackendStatus | None:
        now = self._clock()
        with self._lock:
            state = self._backends.get(name)
            if state is None:
                return None
            return BackendStatus(
                name=name,
                last_request_age_s=now - state.last_request_at if state.last_request_at is not None else None,
                last_scrape_age_s=now - state.last_scrape_at if state.last_scrape_at is not None else None,
                last_scrape_error=state.last_scrape_error,
                scrape_failures=state.scrape_failures,
                consecutive_failures=state.consecutive_failures,
                ejected_for_s=max(state.ejected_until - now, 0.0),
                ejections=state.ejections,
                requests_total=state.requests_total,
                errors_total=state.errors_total,
            )
