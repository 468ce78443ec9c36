"""Per-backend rolling statistics that forget at a fixed half-life, in bounded memory.

Everything here uses *forward decay*: an observation made at time t is stored with weight
exp(λ·(t - L)) for a landmark L shared by all accumulators of one backend, and every read
multiplies by exp(-λ·(now - L)). The effect is the same as multiplying every stored weight by
exp(-λ·Δt) as time passes, but an observation costs O(1) instead of touching every bucket. When
the exponent grows large the landmark moves forward and everything is rescaled once, so the
stored numbers never overflow (with a 10 s half-life that happens about every 7 minutes).

Latencies go into a histogram of log-spaced buckets (8 per octave, so a bucket is ~9 % wide and
a percentile interpolated inside it is within a few percent) from 0.1 ms to ~14 minutes: a fixed
array per histogram, whatever the traffic. Ratios (percentiles, the error rate) are unaffected by
the uniform decay, so they hold their last value while no traffic arrives and shift as soon as
new observations outweigh the old ones. Rates (requests/s, tokens/s) are a decayed count * λ,
corrected for the ramp-up while the window is younger than a few half-lives.

How fast things move with the default 10 s half-life, for a steady stream of requests: a p99 rises
once 1 % of the decayed weight is slow (≈ 0.15 s of slow traffic); a p50 needs half (one
half-life); a p99 falls back only when the slow weight has decayed below 1 % (≈ 6.6 half-lives,
~66 s). The asymmetry is inherent to a tail percentile and errs on the side of caution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIN_MS = 0.1
BUCKETS_PER_OCTAVE = 8
OCTAVES = 23  # 0.1 ms · 2**23 ≈ 839 s: anything slower is clamped into the last bucket
N_BUCKETS = BUCKETS_PER_OCTAVE * OCTAVES
_GROWTH = 2.0 ** (1.0 / BUCKETS_PER_OCTAVE)
_LOG_GROWTH = math.log(_GROWTH)
_EDGES = tuple(MIN_MS * _GROWTH**i for i in range(N_BUCKETS + 1))
# Past this exponent the landmark moves: e**40 ≈ 2e17 keeps full double precision for sums.
_RESCALE_EXPONENT = 40.0
# Decayed weight below which a window counts as empty again (about 10 half-lives of silence
# after one request), so a backend that comes back after a long pause gets an honest rate.
_EMPTY_WEIGHT = 1e-3


def bucket_index(value_ms: float) -> int:
    if not value_ms > MIN_MS:  # also catches NaN
        return 0
    index = int(math.log(value_ms / MIN_MS) / _LOG_GROWTH)
    return min(index, N_BUCKETS - 1)


class DecayingHistogram:
    """Bucket weights in the owner's forward-decay units; reads are scale-free ratios."""

    __slots__ = ("_counts", "total")

    def __init__(self) -> None:
        self._counts = [0.0] * N_BUCKETS
        self.total = 0.0

    def add(self, value_ms: float, weight: float) -> None:
        self._counts[bucket_index(value_ms)] += weight
        self.total += weight

    def add_range(self, low_ms: float, high_ms: float, weight: float) -> None:
        """Spread `weight` uniformly over [low, high]: what a coarse scraped bucket tells us.

        Uniform in linear space, the same assumption Prometheus' histogram_quantile makes.
        """
        low_ms = max(low_ms, 0.0)
        if not high_ms > low_ms or math.isinf(high_ms):
            self.add(low_ms, weight)
            return
        first, last = bucket_index(low_ms), bucket_index(high_ms)
        if first == last:
            self.add(low_ms, weight)
            return
        span = high_ms - low_ms
        for index in range(first, last + 1):
            lo = low_ms if index == first else _EDGES[index]
            hi = high_ms if index == last else _EDGES[index + 1]
            if hi > lo:
                self._counts[index] += weight * (hi - lo) / span
        self.total += weight

    def scale(self, factor: float) -> None:
        self._counts = [c * factor for c in self._counts]
        self.total *= factor

    def quantiles(self, qs: Sequence[float]) -> list[float] | None:
        """Values at the given quantiles (ascending), or None if nothing was observed."""
        if self.total <= 0.0:
            return None
        targets = [min(max(q, 0.0), 1.0) * self.total for q in qs]
        results: list[float] = []
        cumulative = 0.0
        pending = 0
        for index, count in enumerate(self._counts):
            if count <= 0.0:
                continue
            while pending < len(targets) and cumulative + count >= targets[pending]:
                fraction = (targets[pending] - cumulative) / count
                # Geometric interpolation: log-spaced buckets hold log-uniform values.
                results.append(_EDGES[index] * _GROWTH ** min(max(fraction, 0.0), 1.0))
                pending += 1
            cumulative += count
            if pending == len(targets):
                break
        while pending < len(targets):  # rounding left a target past the last bucket
            last = max(i for i, c in enumerate(self._counts) if c > 0.0)
            results.append(_EDGES[last + 1])
            pending += 1
        return results


@dataclass(frozen=True, slots=True)
class StatsSummary:
    """What one backend's rolling window says at one instant; None where nothing was observed."""

    latency_p50_ms: float | None
    latency_p99_ms: float | None
    ttft_p99_ms: float | None
    latency_mean_ms: float | None
    error_rate: float
    rps: float
    tokens_per_s: float
    requests: float  # decayed request count (a confidence measure: ~ rps * half-life / ln 2)


class RollingStats:
    """Decayed request outcomes of one backend. Not thread-safe: the owner serialises access."""

    def __init__(self, half_life_s: float = 10.0, now: float = 0.0, min_rate_window_s: float = 1.0) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s
        self._lambda = math.log(2.0) / half_life_s
        self._min_window = min_rate_window_s
        self._landmark = now
        self._window_start: float | None = None
        self.latency = DecayingHistogram()
        self.ttft = DecayingHistogram()  # from access logs: time to first upstream byte
        self.ttft_scraped = DecayingHistogram()  # from the backend's own TTFT histogram
        self._requests = 0.0
        self._answered = 0.0  # the requests the error rate is over (see record)
        self._errors = 0.0
        self._tokens = 0.0
        self._latency_sum = 0.0
        self._latency_weight = 0.0

    def _weight(self, now: float) -> float:
        exponent = self._lambda * (now - self._landmark)
        if exponent > _RESCALE_EXPONENT:
            self._rescale(now)
            exponent = 0.0
        return math.exp(exponent)

    def _rescale(self, now: float) -> None:
        factor = math.exp(-self._lambda * (now - self._landmark))
        for histogram in (self.latency, self.ttft, self.ttft_scraped):
            histogram.scale(factor)
        self._requests *= factor
        self._answered *= factor
        self._errors *= factor
        self._tokens *= factor
        self._latency_sum *= factor
        self._latency_weight *= factor
        self._landmark = now

    def _decay(self, now: float) -> float:
        """Factor turning stored units into weights as of `now`."""
        return math.exp(-self._lambda * (now - self._landmark))

    def record(
        self,
        now: float,
        *,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
        error: bool = False,
        tokens: float = 0.0,
        answered: bool = True,
    ) -> None:
        """One finished request. Latency and TTFT are optional: a connect failure has neither.

        `answered=False`: the client gave up before any answer. It counts in the request rate
        (and so in Little's law) and its latency is a lower bound worth keeping (a hung backend
        looks slow), but it is neither a success nor an error: the error rate is over answers."""
        if self._window_start is None or self._requests * self._decay(now) < _EMPTY_WEIGHT:
            self._window_start = now
        weight = self._weight(now)
        self._requests += weight
        if answered:
            self._answered += weight
        if error:
            self._errors += weight
        if tokens > 0:
            self._tokens += weight * tokens
        if latency_ms is not None and latency_ms >= 0 and math.isfinite(latency_ms):
            self.latency.add(latency_ms, weight)
            self._latency_sum += weight * latency_ms
            self._latency_weight += weight
        if ttft_ms is not None and ttft_ms >= 0 and math.isfinite(ttft_ms):
            self.ttft.add(ttft_ms, weight)

    def record_ttft_buckets(self, now: float, buckets: Iterable[tuple[float, float, float]]) -> None:
        """New TTFT observations from a scraped histogram: (low_ms, high_ms, count) per bucket."""
        weight = self._weight(now)
        for low, high, count in buckets:
            if count > 0:
                self.ttft_scraped.add_range(low, high, weight * count)

    def _rate(self, stored: float, now: float) -> float:
        if self._window_start is None:
            return 0.0
        decayed = stored * self._decay(now)
        # A window younger than a few half-lives has not accumulated its steady-state weight yet.
        elapsed = max(now - self._window_start, self._min_window)
        return self._lambda * decayed / -math.expm1(-self._lambda * elapsed)

    def summary(self, now: float) -> StatsSummary:
        latency = self.latency.quantiles((0.5, 0.99))
        ttft_source = self.ttft_scraped if self.ttft_scraped.total > 0 else self.ttft
        ttft = ttft_source.quantiles((0.99,))
        return StatsSummary(
            latency_p50_ms=latency[0] if latency else None,
            latency_p99_ms=latency[1] if latency else None,
            ttft_p99_ms=ttft[0] if ttft else None,
            latency_mean_ms=self._latency_sum / self._latency_weight if self._latency_weight > 0 else None,
            error_rate=self._errors / self._answered if self._answered > 0 else 0.0,
            rps=self._rate(self._requests, now),
            tokens_per_s=self._rate(self._tokens, now),
            requests=self._requests * self._decay(now),
        )
