"""The composition root: builds every part of the decision service and runs it.

One gRPC port serves ext_authz, the rate-limit service, gRPC health and reflection. With
`workers > 1` that many processes bind the same port (SO_REUSEPORT) and the kernel spreads
connections across them; Prometheus metrics are then aggregated across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import BaseModel, ConfigDict, Field

from policy_engine.audit.auditor import Auditor
from policy_engine.audit.decision_log import DecisionLog, LogPolicy, LogSink
from policy_engine.audit.metrics import Metrics
from policy_engine.audit.tracing import DecisionTracer, tracer_provider
from policy_engine.canary.service import start_canary
from policy_engine.config import Settings
from policy_engine.decide.tenants import TenantRegistry
from policy_engine.envoy.authz import AuthorizationService
from policy_engine.envoy.http_authz import serve_http, unforwarded_headers
from policy_engine.envoy.ratelimit import RateLimitService
from policy_engine.envoy.usage_charge import UsageCharger
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import load_bundle
from policy_engine.policy.reload import BundleHolder, LastGood, ReloadResult
from policy_engine.quota.memory import MemoryStore
from policy_engine.quota.service import QuotaService
from policy_engine.quota.store import CounterStore, StoreUnavailable
from policy_engine.telemetry.access_log import AccessLogService
from policy_engine.telemetry.hub import BackendSpec, TelemetryHub
from policy_engine.telemetry.metrics import MultiprocessTelemetry, TelemetryCollector
from policy_engine.telemetry.scrape import MetricsScraper

log = logging.getLogger("policy_engine.server")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
)
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


async def _probe_store(store: CounterStore, timeout_s: float) -> None:
    """One read of the shared counter store before serving, so that the first requests do not
    pay for connecting (nor, on a cluster, for the slot map; with Sentinel, for asking the
    sentinels), and a store that cannot be reached is reported at start. Never fatal: while it
    is down each quota policy's on_error decides, and the client connects once it is back."""
    started = time.perf_counter()
    try:
        # A zero charge reads and writes nothing; a few timeouts leave room to connect.
        async with asyncio.timeout(max(1.0, 4 * timeout_s)):
            await store.usage("start-probe", "start-probe", 60.0, "fixed")
    except (StoreUnavailable, TimeoutError) as error:
        log.warning(
            "quota store unreachable at start (%s); until it is back each quota policy's on_error decides",
            error or "no answer",
        )
        return
    log.info("quota store reachable (%.1f ms)", (time.perf_counter() - started) * 1000)


def _store(settings: Settings) -> CounterStore:
    if settings.redis_url:
        from policy_engine.quota.redis_store import RedisStore

        return RedisStore(
            settings.redis_url, timeout_s=settings.redis_timeout_s, cluster=settings.redis_cluster
        )
    return MemoryStore()


class BackendEntry(BaseModel):
    """One backend in a --backends-file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    metrics_url: str | None = None
    capacity: int = Field(0, ge=0, description="Concurrent requests before queueing (for telemetry.load).")
    region: str = ""
    version: str = ""
    model: str = ""
    weight: int = 0
    labels: dict[str, str] = Field(default_factory=dict)


class BackendsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backends: list[BackendEntry]


def unknown_backends(bundle: Bundle, hub: TelemetryHub) -> list[str]:
    """Backends the routing policies (candidates and fallbacks) and the rollouts (stable and
    canary) name that `hub` was not given."""
    named = {
        name
        for policy in bundle.routing
        for route in policy.routes
        for name in (*route.candidates, *route.fallback)
    }
    named |= {name for rollout in bundle.canary for name in (rollout.stable, rollout.canary)}
    return sorted(name for name in named if not hub.knows(name))


def backend_specs(entries: list[str], file: Path | None = None) -> list[BackendSpec]:
    """From the file, then `NAME` (passive: never stale) or `NAME=METRICS_URL` (scraped) entries."""
    specs: dict[str, BackendSpec] = {}
    if file is not None:
        loaded = BackendsFile.model_validate(yaml.safe_load(file.read_text(encoding="utf-8")))
        for entry in loaded.backends:
            specs[entry.name] = BackendSpec(
                entry.name,
                version=entry.version,
                region=entry.region,
                model=entry.model,
                weight=entry.weight,
                capacity=entry.capacity,
                labels=entry.labels,
                metrics_url=entry.metrics_url,
                passive=entry.metrics_url is None,
            )
    for text in entries:
        name, _, url = text.partition("=")
        specs[name.strip()] = BackendSpec(
            name.strip(), metrics_url=url.strip() or None, passive=not url.strip()
        )
    return list(specs.values())


def build_auditor(settings: Settings, tenants: Callable[[], TenantRegistry]) -> Auditor | None:
    """Spans (from the OTEL_* variables) and the decision log (from settings); None when both are off."""
    provider = tracer_provider(os.environ)
    tracer = DecisionTracer(provider) if provider is not None else None
    decision_log = None
    if settings.decision_log:
        decision_log = DecisionLog(
            LogSink(settings.decision_log),
            LogPolicy(only=settings.decision_log_only, sample=settings.decision_log_sample),
            secrets=settings.decision_log_secrets,
        )
    if tracer is None and decision_log is None:
        return None
    return Auditor(tracer, decision_log, tenants)


async def _every(action: Callable[[], None], stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """`action` every interval until `stop`, and once more then; a failing run is logged and
    the next one still happens."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        try:
            action()
        except Exception:
            log.exception("%s failed", getattr(action, "__qualname__", action))


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Plaintext inside a mesh (the sidecar does mTLS); TLS, optionally mutual, outside one."""
    address = settings.grpc_address
    if settings.tls_cert is None or settings.tls_key is None:
        return server.add_insecure_port(address)
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(address, credentials)


async def serve(settings: Settings, worker: int = 0, last_good: Path | None = None) -> None:
    """Run one serving process until SIGTERM/SIGINT, then drain in-flight calls."""
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry)

    checked: set[str] = set()  # bundle versions already checked

    def check_bundle() -> None:
        # What nothing else would say about a bundle, once per version (worker 0 speaks for all).
        bundle = holder.pipeline.bundle
        if worker != 0 or bundle.version in checked:
            return
        checked.add(bundle.version)
        dropped = unforwarded_headers(bundle) if settings.http_port is not None else []
        if dropped:
            log.warning(
                "the HTTP ext_authz transport forwards only x-pe-* headers upstream; "
                "these headers the policies set will not reach the backends that way: %s",
                ", ".join(dropped),
            )
        # A route whose backends the service was not given never routes (they count as stale).
        unknown = unknown_backends(bundle, hub)
        if unknown:
            log.warning(
                "the policies name backends this service was not given (--backend, "
                "--backends-file; the chart's `backends`): %s; they count as stale, so routes "
                "that need them answer 503 no_backend_available",
                ", ".join(unknown),
            )

    def reloaded(result: ReloadResult) -> None:
        metrics.reloaded(result.ok, result.version, time.time())
        if result.ok:
            check_bundle()

    holder = BundleHolder(
        settings.policies, on_reload=reloaded, last_good=LastGood(last_good) if last_good else None
    )
    metrics.set_bundle(holder.version)
    metrics.reload_ok.set(0 if holder.rejected else 1)
    metrics.reload_time.set(time.time())
    auditor = build_auditor(settings, lambda: holder.pipeline.bundle.tenants)
    hub = TelemetryHub(
        backend_specs(settings.backends, settings.backends_file),
        stale_after_s=settings.stale_after_s,
        half_life_s=settings.half_life_s,
    )
    check_bundle()
    scraper = MetricsScraper(hub, interval_s=settings.scrape_interval_s)
    store = _store(settings)
    quota = QuotaService(store, lambda: holder.pipeline.bundle, metrics)
    access_log = AccessLogService(hub, charge=UsageCharger(quota.charge_reports).charge)
    canary = start_canary(settings, worker, lambda: holder.pipeline.bundle, hub, registry)

    # Workers share the port on purpose; one process alone must own it, or a second service
    # started on the same port would silently take half the connections (gRPC's default is on).
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(settings.workers > 1))])
    authorization = AuthorizationService(
        lambda: holder.pipeline,
        hub.snapshot,
        quota,
        metrics,
        settings.max_body_bytes,
        auditor,
        canary_weights=canary.weights,
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization, server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(quota), server)
    access_log.add_to_server(server)
    telemetry_metrics = TelemetryCollector(hub, access_log, scraper)
    mirror = None
    if _MULTIPROC_ENV in os.environ:
        mirror = MultiprocessTelemetry(telemetry_metrics, registry)
    else:
        registry.register(telemetry_metrics)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        port = _listen(server, settings)
    except RuntimeError:  # grpc.aio's "failed to bind"; the port was free a moment ago
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: address in use or not permitted")
    if settings.redis_url:
        await _probe_store(store, settings.redis_timeout_s)
    if scraper.targets:
        # One round of scrapes before serving: decisions made before any telemetry arrived
        # would find every scraped backend stale and answer 503.
        await scraper.scrape_once()
        hub.snapshot(force=True)
        scraper.start()
    await server.start()
    http_server = None
    if settings.http_port is not None:
        http_server = await serve_http(
            authorization,
            settings.bind_host,
            settings.http_port,
            settings.max_body_bytes,
            settings.workers > 1,
        )
        log.info("worker %d serving HTTP ext_authz on %s:%d", worker, settings.host, http_server.port)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if worker == 0 and settings.metrics_port and _MULTIPROC_ENV not in os.environ:
        _serve_metrics(settings, registry)
    if settings.port_file is not None and worker == 0:
        settings.port_file.write_text(str(port))
    log.info("worker %d serving on %s:%d, bundle %s", worker, settings.host, port, holder.version)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(holder.watch(stop)) if settings.reload else None
    flusher = asyncio.create_task(_every(auditor.flush, stop)) if auditor is not None else None
    mirroring = asyncio.create_task(_every(mirror.refresh, stop)) if mirror is not None else None
    await stop.wait()
    deadline = loop.time() + settings.grace_s
    log.info("worker %d draining (grace %.1fs)", worker, settings.grace_s)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Both transports drain side by side, each within the grace period.
    http_drained = http_server.drain(settings.grace_s) if http_server is not None else asyncio.sleep(0)
    await asyncio.gather(server.stop(settings.grace_s), http_drained)
    await access_log.drain()  # the charges of the last log entries
    await scraper.stop()
    await canary.close()
    if flusher is not None:
        await flusher
    if mirroring is not None and mirror is not None:
        await mirroring
        with contextlib.suppress(Exception):
            mirror.refresh()  # what the drained requests added
    if auditor is not None:
        auditor.close(max(0.5, deadline - loop.time()))
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await store.close()


def _worker_main(settings: Settings, worker: int, last_good: Path | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s w{worker} %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every backend scrape at INFO: one line per backend per second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(serve(settings, worker, last_good))


def run(settings: Settings) -> None:
    """Serve with `settings.workers` processes; returns when all have stopped."""
    _port_free(settings)
    if settings.workers == 1:
        _worker_main(settings, 0)
        return
    if not settings.redis_url:
        log.warning(
            "%d workers with in-memory quotas: each worker counts separately; use --redis-url",
            settings.workers,
        )
    load_bundle(settings.policies)  # a bad directory fails here, not in every worker over and over
    with (
        tempfile.TemporaryDirectory(prefix="pe-metrics-") as metrics_dir,
        tempfile.TemporaryDirectory(prefix="pe-last-good-") as kept,
    ):
        last_good = Path(kept)
        os.environ[_MULTIPROC_ENV] = metrics_dir
        context = multiprocessing.get_context("spawn")
        # The metrics port first: when it is taken, fail before any worker exists.
        _serve_multiprocess_metrics(settings)
        workers = [_worker_process(context, settings, i, last_good) for i in range(settings.workers)]
        stopping = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for process in workers:
                if process.pid is not None and process.is_alive():
                    os.kill(process.pid, signum)

        # Installed before the first start: a SIGTERM during start-up reaches the workers too.
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        try:
            for process in workers:
                process.start()
            _supervise(workers, lambda i: _worker_process(context, settings, i, last_good), lambda: stopping)
        except BaseException:
            forward(signal.SIGTERM, None)
            raise
        finally:
            for process in workers:
                if process.pid is not None:
                    process.join()


class WorkersFailing(RuntimeError):
    """Workers keep exiting right after they start: restarting them would only repeat it."""


def _worker_process(context: Any, settings: Settings, index: int, last_good: Path) -> Any:
    return context.Process(
        target=_worker_main, args=(settings, index, last_good), daemon=False, name=f"worker-{index}"
    )


def _supervise(workers: list[Any], replacement: Callable[[int], Any], stopping: Callable[[], bool]) -> None:
    """Until a signal stops the service: a worker that exits (a crash, the OOM killer) is replaced,
    so the others serve meanwhile and the capacity comes back."""
    from multiprocessing.connection import wait

    from prometheus_client import multiprocess

    restarts: list[float] = []
    while not stopping():
        wait([p.sentinel for p in workers if p.is_alive()], timeout=1.0)
        for index, process in enumerate(workers):
            if process.exitcode is None or stopping():
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(restarts) > _MAX_RESTARTS * len(workers):
                raise WorkersFailing(
                    f"workers exited {len(restarts)} times within {_RESTART_WINDOW_S:.0f} s "
                    f"(worker {index}: exit code {process.exitcode}); see the log above"
                )
            log.warning("worker %d exited (code %s): starting a new one", index, process.exitcode)
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
            workers[index] = replacement(index)
            workers[index].start()


_RESTART_WINDOW_S = 60.0
_MAX_RESTARTS = 3  # per worker and window


def _serve_multiprocess_metrics(settings: Settings) -> None:
    if not settings.metrics_port:
        return
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    _serve_metrics(settings, registry)


def _serve_metrics(settings: Settings, registry: CollectorRegistry) -> None:
    try:
        start_http_server(settings.metrics_port, settings.metrics_address, registry=registry)
    except OSError as error:
        address = f"{settings.metrics_address}:{settings.metrics_port}"
        raise OSError(f"cannot serve metrics on {address}: {error.strerror or error}") from None


def _port_free(settings: Settings) -> None:
    """The workers bind with SO_REUSEPORT, which would let them join another process that
    holds the port the same way: a plain bind first fails when anything holds it."""
    for port in (settings.port, settings.http_port):
        if port is None:
            continue
        family = socket.AF_INET6 if ":" in settings.bind_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the servers bind: a port whose last connections are in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.bind_host, port))
            except OSError as error:
                raise OSError(f"cannot listen on {settings.host}:{port}: {error.strerror or error}") from None
