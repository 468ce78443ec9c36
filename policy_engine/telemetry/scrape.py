"""Scrapes each backend's Prometheus /metrics (vLLM's metric names) into the telemetry hub.

Read, summed over label sets (a server may report per model or per engine):
`vllm:num_requests_running` → inflight, `vllm:num_requests_waiting` → queue depth,
`vllm:kv_cache_usage_perc` (older vLLM: `vllm:gpu_cache_usage_perc`; the maximum is kept) →
KV-cache use, and the `vllm:time_to_first_token_seconds` histogram, whose growth between two
scrapes becomes live TTFT observations in the hub.

All targets are scraped concurrently every `interval_s`, each bounded by `timeout_s`. A failed
scrape (refused, timed out, not 200, unparsable) is reported to the hub as such and is otherwise
just missing data: the backend goes stale once nothing fresh arrived for the hub's
`stale_after_s`. Nothing a backend sends can stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from types import TracebackType

import httpx
from prometheus_client.parser import text_string_to_metric_families

from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.observations import ScrapeSample

log = logging.getLogger("policy_engine.telemetry.scrape")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
TTFT = "vllm:time_to_first_token_seconds"
_FAMILIES = frozenset({RUNNING, WAITING, *KV_CACHE, TTFT})
_SAMPLES = frozenset({RUNNING, WAITING, *KV_CACHE, f"{TTFT}_bucket"})
MAX_BODY_BYTES = 8 * 1024 * 1024  # vLLM's page is ~100 KB; anything far bigger is not a metrics page


class ScrapeError(Exception):
    pass


def _relevant(text: str) -> str:
    """Only the lines of the families we read.

    A vLLM page holds dozens of histograms; parsing all of it in Python would hold the event loop
    (which also serves the decisions) for milliseconds per backend per scrape.
    """
    kept: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(maxsplit=3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] in _FAMILIES:
                kept.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in _SAMPLES:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse_metrics(text: str) -> ScrapeSample:
    """A Prometheus text page → the values the hub needs; raises ValueError if unparsable."""
    running: float | None = None
    waiting: float | None = None
    kv: float | None = None
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(_relevant(text)):
        for sample in family.samples:
            value = float(sample.value)
            if math.isnan(value):
                continue
            if sample.name == RUNNING:
                running = (running or 0.0) + value
            elif sample.name == WAITING:
                waiting = (waiting or 0.0) + value
            elif sample.name in KV_CACHE:
                kv = value if kv is None else max(kv, value)
            elif sample.name == f"{TTFT}_bucket" and "le" in sample.labels:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + value
    return ScrapeSample(
        running=running,
        waiting=waiting,
        kv_cache_usage=min(max(kv, 0.0), 1.0) if kv is not None else None,
        ttft_buckets=tuple(sorted(buckets.items())) if buckets else None,
    )


class MetricsScraper:
    """Scrapes `targets` (backend name → metrics URL) into `hub` until stopped.

    Without `targets`, the hub's backends with a `metrics_url` are scraped. Without `client`, one
    is created (ignoring proxy environment variables: targets are in-cluster) and closed on stop.
    """

    def __init__(
        self,
        hub: TelemetryHub,
        targets: Mapping[str, str] | None = None,
        *,
        interval_s: float = 1.0,
        timeout_s: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._hub = hub
        self._targets = dict(targets) if targets is not None else None
        self.interval_s = interval_s
        # Below the interval, so a hung backend cannot make scrapes pile up.
        self.timeout_s = timeout_s if timeout_s is not None else min(0.8 * interval_s, 5.0)
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self.scrapes = 0  # started
        self.successes = 0  # completed with data (counted then: a scrape in flight is neither)
        self.failures = 0

    @property
    def targets(self) -> dict[str, str]:
        if self._targets is not None:
            return dict(self._targets)
        return {spec.name: spec.metrics_url for spec in self._hub.backends if spec.metrics_url}

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False)
        return self._client

    async def _fetch(self, url: str) -> str:
        async with self._http().stream("GET", url, timeout=self.timeout_s) as response:
            if response.status_code != 200:
                raise ScrapeError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ScrapeError(f"body over {MAX_BODY_BYTES} bytes")
            return body.decode("utf-8", errors="replace")

    async def scrape_target(self, name: str, url: str) -> bool:
        """Scrape one backend; True if it reported fresh data. Never raises (but cancellation)."""
        self.scrapes += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                text = await self._fetch(url)
            sample = parse_metrics(text)
        except TimeoutError:
            return self._failed(name, f"timed out after {self.timeout_s:g}s")
        except ScrapeError as error:
            return self._failed(name, str(error))
        except (httpx.HTTPError, ValueError, UnicodeError) as error:
            return self._failed(name, f"{type(error).__name__}: {error}".rstrip(": "))
        except Exception as error:  # a scrape must never take the loop down
            log.warning("scrape of %s failed unexpectedly", name, exc_info=True)
            return self._failed(name, f"{type(error).__name__}: {error}")
        self._hub.observe_scrape(name, sample)
        self.successes += 1
        return True

    def _failed(self, name: str, reason: str) -> bool:
        self.failures += 1
        self._hub.scrape_failed(name, reason)
        log.debug("scrape of %s failed: %s", name, reason)
        return False

    async def scrape_once(self) -> dict[str, bool]:
        """Scrape every target concurrently; backend name → success."""
        targets = self.targets
        results = await asyncio.gather(*(self.scrape_target(n, u) for n, u in targets.items()))
        return dict(zip(targets, results, strict=True))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.scrape_once()
            except Exception:
                log.exception("scrape round failed")
            # Fixed cadence from the start; after an overrun, skip missed ticks instead of bursting.
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:
                next_at = now + self.interval_s - (now - next_at) % self.interval_s
            await asyncio.sleep(next_at - now)

    def start(self) -> None:
        """Start scraping in the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-scrape")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop the loop, wait for it, and close the HTTP client if this scraper created it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> MetricsScraper:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
