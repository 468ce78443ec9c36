"""Envoy + policy-engine against Envoy alone, measured side by side in one run.

Run: .venv/bin/python bench/gateway.py [--duration 10] [--connections 32] [--rate 1000]
Needs `wrk` (Debian: apt-get install -y wrk). Traffic goes to 127.0.0.1 only and every
process started here is stopped at the end.

Every setup proxies to the same model server, a second Envoy (C++, one thread) answering every
request with a chat completion and its usage, so the gateway reads the usage and charges it
after each response, as in production, at the cost of a C++ upstream. Rows:
- Envoy alone, proxying;
- Envoy + a do-nothing HTTP ext_authz in C++ (a second Envoy answering 200 itself): the floor of
  any decision service asked over HTTP on this machine;
- Envoy + a do-nothing Python gRPC ext_authz (bench/noop_authz.py, same grpc.aio stack, no
  decision): the floor of any Python gRPC decision service on this machine; and the same over
  Envoy's HTTP ext_authz protocol on plain asyncio, the floor of the other transport; and that
  HTTP no-op (answering with a route) behind the gateway's whole Envoy configuration but the
  access log: what the configuration costs in Envoy, apart from any decision; with --busy-us,
  the same no-op spinning that many µs of CPU per request: what a decision's CPU cost alone
  does to the latency on this machine;
- Envoy + policy-engine (the example policies, a premium tenant, a chat request of ~1 KB, the
  access-log stream and token charging after each response: from the access log, or through the
  rate-limit filter with --charging rate_limit) with 1 and 2 workers, asked over gRPC and over
  HTTP (`serve --http-port`, `envoy-config --policy-http`), with token usage read by Lua and by
  Envoy's native filters (`envoy-config --usage-extraction`), with quotas in memory or, with
  --stores redis / redis-cluster / redis-sentinel, in a Redis server, a cluster of 3 primaries or
  a primary with a replica and 3 sentinels started here (the servers' CPU per request is printed
  after the table); with --baseline DIR, each policy-engine row also with the service of another checkout
  (`git worktree add DIR COMMIT`), side by side.
Three loads:
- saturation: wrk with N connections as fast as possible → requests/s, and the CPU time each
  process used per request (from /proc), which gives what the service alone could do with
  two cores of its own: 2 s of CPU per second / its CPU per request;
- fixed rate: wrk with a per-connection delay giving about --rate requests/s → p50/p90/p99, in
  --rounds rounds that take turns between the setups (all of them stay up for the whole run, the
  idle ones' timers running meanwhile), so that a noisy spell of this shared machine falls on
  every setup alike; the added p99 is the median over the rounds of a setup's p99 minus Envoy
  alone's in the same round;
- one connection, back to back and with 10 ms between requests → the median of a request that
  finds the machine's caches warm, and one that finds them cooled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy_engine.envoy.bootstrap import UsageExtraction  # noqa: E402
from tests.e2e.harness import (  # noqa: E402
    ServiceProcess,
    envoy_binary,
    free_port,
    start_service,
    stop_process,
    wait_until,
)
from tests.redis_server import start_cluster, start_redis, start_sentinel_group  # noqa: E402

BACKENDS = ["llama-70b-h100-a", "llama-70b-h100-b", "llama-70b-a100-a", "llama-70b-a100-b"]
BODY = json.dumps(
    {
        "model": "llama-3-70b",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant for a platform team."},
            {"role": "user", "content": "Summarize how the gateway chooses a backend. " * 20},
        ],
    }
)
# What the model server answers: a chat completion with its usage, as a backend reports it, so
# the gateway reads the usage and charges it after every response, as in production.
MODEL_BODY = (
    '{"id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": '
    '{"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], '
    '"usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320}}'
)

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer sk-acme-premium-key-0001"
{delay}
"""


_BUFFER_FILTER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1 << 20,
    },
}


@dataclass
class Setup:
    """One gateway under test, up for the whole run, and what was measured of it."""

    name: str
    url: str
    pids: dict[str, tuple[int, ...]]  # the processes whose CPU time is counted, by what they are
    service: ServiceProcess | None = None  # a policy-engine setup
    saturation: dict[str, float] = field(default_factory=dict)
    warm: dict[str, float] = field(default_factory=dict)
    cold: dict[str, float] = field(default_factory=dict)
    paced: list[dict[str, float]] = field(default_factory=list)  # one per round
    sent: float = 0.0  # requests sent to it in all
    charged: float = 0.0  # usage charged per request sent (policy-engine setups)


def envoy_config(
    listen_port: int,
    policy_port: int | None,
    model_port: int,
    full: bool = True,
    http_port: int | None = None,
    usage: UsageExtraction = "lua",
    charging: Literal["access_log", "rate_limit"] = "access_log",
) -> dict[str, Any]:
    """The project's bootstrap in front of the model server (every backend is the C++ model
    server at `model_port`). Without a service (`policy_port` and `http_port` None) only the
    router is left: Envoy alone, proxying. `full=False` keeps only ext_authz, for the no-op
    servers, and routes every request to one backend as they set no route header; with
    `http_port` ext_authz speaks Envoy's HTTP protocol to that port (the project's HTTP
    transport); `usage`: how Envoy reads token usage."""
    from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap

    config = bootstrap(
        GatewayConfig(
            listen_port=listen_port,
            admin_port=0,
            policy=Upstream("127.0.0.1", policy_port or 1),
            backends={name: Upstream("127.0.0.1", model_port) for name in BACKENDS},
            authz_transport="http" if http_port else "grpc",
            policy_http=Upstream("127.0.0.1", http_port) if http_port else None,
            usage_extraction=usage,
            charging=charging,
        )
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    alone = policy_port is None and http_port is None
    if alone or not full:
        kept = "envoy.filters.http.router" if alone else "envoy.filters.http.ext_authz"
        manager["http_filters"] = [
            f for f in manager["http_filters"] if f["name"] in (kept, "envoy.filters.http.router")
        ]
        manager.pop("access_log", None)
        manager["route_config"]["virtual_hosts"][0]["routes"] = [
            {"match": {"prefix": "/"}, "route": {"cluster": f"backend-{BACKENDS[0]}"}}
        ]
    return config


def noop_envoy_config(port: int, body: str | None = None) -> dict[str, Any]:
    """An Envoy that answers every request 200 itself: with no body, a do-nothing HTTP ext_authz
    server in C++, the floor of any decision service reached over HTTP on this machine; with a
    JSON body, the model server every setup proxies to."""
    response: dict[str, Any] = {"status": 200}
    route: dict[str, Any] = {"match": {"prefix": "/"}, "direct_response": response}
    if body is not None:
        response["body"] = {"inline_string": body}
        route["response_headers_to_add"] = [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "noop",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            # A direct response sent before the request body is read closes the connection: the
            # buffer filter reads it first, so the caller's connection is kept.
            _BUFFER_FILTER,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    listener = {
        "name": "noop",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    return {"static_resources": {"listeners": [listener]}}


def start_envoy(
    config: dict[str, Any], workdir: Path, name: str, threads: int = 2
) -> subprocess.Popen[bytes]:
    import yaml

    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(path),
            "--disable-hot-restart",
            "-l",
            "error",
            "--concurrency",
            str(threads),
            "--base-id",
            str(os.getpid() % 10000 + len(name)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"{name}.log").open("wb"),
        start_new_session=True,
    )
    return process


@dataclass
class Store:
    """Redis processes started for the policy-engine rows' counters."""

    url: str
    pids: tuple[int, ...]  # the servers whose CPU is counted (not the sentinels)
    close: Callable[[], None]


def start_stores(kinds: list[str]) -> dict[str, Store]:
    stores: dict[str, Store] = {}
    if "redis" in kinds:
        server = start_redis()
        stores["redis"] = Store(server.url, (server.pid or 0,), server.close)
    if "redis-cluster" in kinds:
        cluster = start_cluster(primaries=3)
        primaries = tuple(n.pid or 0 for n in cluster.primaries)
        stores["redis-cluster"] = Store(cluster.url, primaries, cluster.close)
    if "redis-sentinel" in kinds:
        group = start_sentinel_group()
        servers = (group.primary.pid or 0, *(r.pid or 0 for r in group.replicas))
        stores["redis-sentinel"] = Store(group.url, servers, group.close)
    return stores


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text.rsplit(")", 1)[1].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == current)
    return total


def measured(
    url: str,
    duration: int,
    connections: int,
    script: Path,
    pids: dict[str, tuple[int, ...]],
    threads: int = 2,
) -> dict[str, float]:
    """A wrk run with the CPU each named group of process trees used per request."""
    before = {name: sum(tree_cpu(pid) for pid in group) for name, group in pids.items()}
    result = wrk(url, duration, connections, script, threads=threads)
    for name, group in pids.items():
        used = sum(tree_cpu(pid) for pid in group) - before[name]
        result[f"{name}_cpu_us"] = used / max(result["requests"], 1) * 1e6
    return result


def wrk(url: str, duration: int, connections: int, script: Path, threads: int = 2) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    result: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for label in ("50", "90", "99"):
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)$", out, re.M)
        if match:
            value, unit = float(match.group(1)), match.group(2)
            result[f"p{label}_ms"] = value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=1000, help="target requests/s of the fixed-rate load")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=["grpc", "http"],
        default=["grpc", "http"],
        help="ext_authz transports",
    )
    parser.add_argument(
        "--usage",
        nargs="+",
        choices=["lua", "native"],
        default=["lua"],
        help="how Envoy reads token usage in the policy-engine rows (envoy-config --usage-extraction)",
    )
    parser.add_argument(
        "--charging",
        nargs="+",
        choices=["access_log", "rate_limit"],
        default=["access_log"],
        help="how the policy-engine rows charge usage after the response (envoy-config --charging)",
    )
    parser.add_argument(
        "--stores",
        nargs="+",
        choices=["memory", "redis", "redis-cluster", "redis-sentinel"],
        default=["memory"],
        help="quota counters of the policy-engine rows: in memory, or in Redis this script starts on "
        "loopback: one server, a cluster of 3 primaries, or a primary with a replica and 3 sentinels "
        "(the servers' CPU is printed after the table)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit (git worktree add /tmp/base COMMIT): every policy-engine "
        "row is run a second time with that checkout's service, side by side (same Envoy setup)",
    )
    parser.add_argument("--envoy-threads", type=int, default=2, help="Envoy --concurrency, every setup")
    parser.add_argument(
        "--rounds", type=int, default=3, help="paced runs of each setup, taking turns between setups"
    )
    parser.add_argument(
        "--busy-us",
        type=float,
        nargs="*",
        default=[],
        help="more floors: the HTTP no-op behind the gateway's configuration, spinning this many "
        "µs of CPU per request (a decision's cost without a decision)",
    )
    args = parser.parse_args()
    # A SIGTERM (a timeout, a stopped run) unwinds like Ctrl-C: every process started here stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="pe-bench-"))
    saturate = workdir / "saturate.lua"
    saturate.write_text(WRK_SCRIPT.format(body=json.dumps(BODY), delay=""))
    paced_connections = 10
    delay_ms = max(0.0, paced_connections * 1000 / args.rate)
    paced = workdir / "paced.lua"
    paced.write_text(
        WRK_SCRIPT.format(body=json.dumps(BODY), delay=f"function delay() return {delay_ms} end")
    )
    # One connection, 10 ms between requests: every request meets caches the machine cooled
    # meanwhile; the same connection back to back shows the warm cost.
    lone = workdir / "lone.lua"
    lone.write_text(WRK_SCRIPT.format(body=json.dumps(BODY), delay="function delay() return 10 end"))
    lone_seconds = max(3, args.duration // 2)

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"machine: {platform.machine()} cores={os.cpu_count()} python={platform.python_version()} "
        f"load before={os.getloadavg()[0]:.2f}"
    )
    setups: list[Setup] = []
    servers: dict[str, Store] = {}
    processes: list[subprocess.Popen[bytes]] = []
    services: list[ServiceProcess] = []

    def answering(url: str, what: str) -> None:
        command = ["curl", "-sf", "-o", "/dev/null", "-X", "POST", url]
        wait_until(lambda: subprocess.run(command).returncode == 0, 20, what)

    try:
        # Every setup is started first and stays up: the paced runs below take turns between
        # them, round after round, so that a noisy spell of this shared machine lands on every
        # setup alike rather than on whichever ran then.
        model_port = free_port()
        model = start_envoy(noop_envoy_config(model_port, MODEL_BODY), workdir, "model", 1)
        processes.append(model)
        answering(f"http://127.0.0.1:{model_port}/", "the model server")
        port = free_port()
        alone = start_envoy(envoy_config(port, None, model_port), workdir, "alone", args.envoy_threads)
        processes.append(alone)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        answering(url, "envoy alone")
        setups.append(Setup("Envoy alone", url, {"envoy": (alone.pid,)}))

        noop_port = free_port()
        noop_envoy = start_envoy(noop_envoy_config(noop_port), workdir, "noop-cpp", 1)
        processes.append(noop_envoy)
        port = free_port()
        envoy = start_envoy(
            envoy_config(port, None, model_port, full=False, http_port=noop_port),
            workdir,
            "noop-cpp-front",
            args.envoy_threads,
        )
        processes.append(envoy)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        answering(url, "envoy with the C++ no-op ext_authz")
        setups.append(
            Setup(
                "Envoy + no-op C++ (Envoy) HTTP ext_authz",
                url,
                {"envoy": (envoy.pid,), "service": (noop_envoy.pid,)},
            )
        )

        # The Python floors; the last one behind the gateway's whole Envoy configuration (routes
        # on x-pe-route, header rules, the usage reader), which the no-op answers with a route:
        # the difference to the row before is that configuration's cost in Envoy, and the
        # policy-engine rows' difference to it is the service's.
        floors = [("gRPC", False, 0.0), ("HTTP", False, 0.0), ("HTTP", True, 0.0)]
        floors += [("HTTP", True, busy) for busy in args.busy_us if busy > 0]
        for transport, gateway, busy in floors:
            name = f"noop-{transport}{'-gateway' if gateway else ''}-{busy:.0f}"
            port_file = workdir / f"{name}.port"
            command = [sys.executable, str(ROOT / "bench" / "noop_authz.py"), str(port_file)]
            if transport == "HTTP":
                command.append("--http")
            if gateway:
                command += ["--route", BACKENDS[0], "--busy-us", str(busy)]
            noop = subprocess.Popen(command, start_new_session=True)
            processes.append(noop)
            wait_until(
                lambda port_file=port_file: port_file.exists() and port_file.read_text() != "", 20, "no-op"
            )
            port = free_port()
            noop_port = int(port_file.read_text())
            if gateway:
                config = envoy_config(port, None, model_port, http_port=noop_port)
                # No access-log sink to stream to (the no-op serves no gRPC).
                listener = config["static_resources"]["listeners"][0]
                listener["filter_chains"][0]["filters"][0]["typed_config"].pop("access_log")
            elif transport == "HTTP":
                config = envoy_config(port, None, model_port, full=False, http_port=noop_port)
            else:
                config = envoy_config(port, noop_port, model_port, full=False)
            envoy = start_envoy(config, workdir, name, args.envoy_threads)
            processes.append(envoy)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            answering(url, "envoy with the no-op ext_authz")
            noop_pids: dict[str, tuple[int, ...]] = {"envoy": (envoy.pid,), "service": (noop.pid,)}
            label = "the gateway's Envoy configuration" if gateway else "ext_authz only"
            what = f"Python HTTP spending {busy:.0f} µs of CPU" if busy else f"no-op Python {transport}"
            setups.append(Setup(f"Envoy ({label}) + {what} ext_authz", url, noop_pids))
        # The example policies with the premium token budget out of reach: a fast run would
        # otherwise spend it (each request reserves its estimate) and measure cheap 429s.
        policies = workdir / "policies"
        shutil.copytree(ROOT / "policies", policies)
        quotas = policies / "quotas.yaml"
        raised = quotas.read_text().replace("total: 5000000,", "total: 5000000000000,")
        if raised == quotas.read_text():
            sys.exit("policies/quotas.yaml changed: update the premium budget this benchmark raises")
        quotas.write_text(raised)
        combinations = [
            (transport, workers, usage, charging, store)
            for transport in args.transports
            for workers in args.workers
            for usage in args.usage
            for charging in args.charging
            for store in args.stores
        ]
        servers.update(start_stores(args.stores))
        code_versions: list[Path | None] = (
            [None] if args.baseline is None else [args.baseline.resolve(), None]
        )
        baseline_commit = ""
        if args.baseline is not None:
            # `python -m policy_engine` in the baseline's directory must import the baseline.
            imported = subprocess.run(
                [sys.executable, "-c", "import policy_engine; print(policy_engine.__file__)"],
                cwd=args.baseline,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if not Path(imported).resolve().is_relative_to(args.baseline.resolve()):
                sys.exit(f"the baseline's service would import {imported}, not {args.baseline}'s package")
            baseline_commit = subprocess.run(
                ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        for (transport, workers, usage, charging, store), code in (
            (combination, code) for combination in combinations for code in code_versions
        ):
            http_port = free_port() if transport == "http" else None
            extra = ["--no-reload", *(["--http-port", str(http_port)] if http_port else [])]
            redis_url = servers[store].url if store in servers else None
            if store == "redis-cluster":
                extra.append("--redis-cluster")
            service = start_service(
                policies,
                backends=BACKENDS,
                workers=workers,
                extra_args=extra,
                redis_url=redis_url,
                code=code or ROOT,
            )
            services.append(service)
            port = free_port()
            config = envoy_config(
                port, service.port, model_port, http_port=http_port, usage=usage, charging=charging
            )
            name = f"pe{workers}{transport}{usage}{charging}{store}{'' if code is None else 'base'}"
            envoy = start_envoy(config, workdir, name, args.envoy_threads)
            processes.append(envoy)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            probe = [
                *("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d", BODY),
                *("-H", "authorization: Bearer sk-acme-premium-key-0001", url),
            ]
            try:
                wait_until(
                    lambda probe=probe: subprocess.run(probe, capture_output=True, text=True).stdout == "200",
                    30,
                    "gateway",
                )
            except TimeoutError:
                answer = subprocess.run([*probe[:2], "-i", *probe[2:]], capture_output=True, text=True)
                logs = (workdir / f"{name}.log").read_text()[-2000:]
                logs += service.output()[-2000:]
                sys.exit(f"the gateway does not answer 200: {answer.stdout[:500]}\n{logs}")
            plural = "s" if workers > 1 else ""
            charged_by = charging.replace("_", "-")
            quotas_in = {
                "redis": ", quotas in Redis",
                "redis-cluster": ", quotas in a Redis Cluster of 3 primaries",
                "redis-sentinel": ", quotas in Redis through Sentinel",
            }.get(store, "")
            label = (
                f"{transport} ({workers} worker{plural}, {usage} usage, charged by {charged_by}{quotas_in})"
            )
            if code is not None:
                label += f", baseline {baseline_commit}"
            pids: dict[str, tuple[int, ...]] = {"envoy": (envoy.pid,), "service": (service.process.pid,)}
            if store in servers:
                pids["redis"] = servers[store].pids
            setups.append(Setup(f"Envoy + policy-engine, {label}", url, pids, service))
        time.sleep(1)

        for setup in setups:
            setup.saturation = measured(setup.url, args.duration, args.connections, saturate, setup.pids)
            setup.warm = wrk(setup.url, lone_seconds, 1, saturate, threads=1)
            setup.cold = wrk(setup.url, lone_seconds, 1, lone, threads=1)
            setup.sent += sum(r["requests"] for r in (setup.saturation, setup.warm, setup.cold))
        for round_index in range(args.rounds):
            # A different setup goes first each round: none always follows the same neighbour.
            shift = round_index % len(setups)
            for setup in setups[shift:] + setups[:shift]:
                result = measured(setup.url, args.duration, paced_connections, paced, setup.pids, threads=1)
                setup.paced.append(result)
                setup.sent += result["requests"]
        time.sleep(1)  # the last charges are made after their responses
        for setup in setups:
            if setup.service is not None:
                # Every answered request is charged its reported usage after the response.
                charged = re.search(
                    r'^pe_tokens_charged_total\{kind="total_tokens"\} ([0-9.e+]+)$',
                    setup.service.metrics(),
                    re.M,
                )
                setup.charged = float(charged.group(1)) / 320 / setup.sent if charged else 0.0
    finally:
        for service in services:
            service.stop()
        for process in processes:
            stop_process(process)
        for server in servers.values():
            server.close()

    print(
        f"\nsaturation: wrk -t2 -c{args.connections} -d{args.duration}s; "
        f"fixed rate: wrk -t1 -c{paced_connections} with {delay_ms:.1f} ms delay per connection "
        f"(≈{args.rate} req/s), {args.rounds} rounds taking turns between the setups, medians of the "
        "rounds (added p99: the median of each round's p99 minus Envoy alone's in that round, with "
        "the rounds' range); CPU: µs of CPU time per request during the saturation run (a service's "
        "row counts all its processes), and the service's during the paced runs (median of the "
        f"rounds); one connection: wrk -t1 -c1 -d{lone_seconds}s back to back "
        "(warm) and with 10 ms between requests (cold), p50\n"
    )
    print(
        "| setup | saturation req/s | ratio | non-2xx | Envoy CPU µs/req | service CPU µs/req "
        "| service alone on 2 cores, req/s | paced req/s | p50 ms | p90 ms | p99 ms | added p99 ms "
        "| added p99 range ms | one conn. warm p50 ms | one conn. cold p50 ms | paced service CPU µs/req |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = setups[0]
    for setup in setups:
        sat = setup.saturation
        service_cpu = sat.get("service_cpu_us")
        service_text = f"{service_cpu:.0f}" if service_cpu else "—"
        capacity = f"{2e6 / service_cpu:.0f}" if service_cpu else "—"
        added = [
            mine.get("p99_ms", 0) - theirs.get("p99_ms", 0)
            for mine, theirs in zip(setup.paced, base.paced, strict=True)
        ]

        def median(key: str, setup: Setup = setup) -> float:
            return statistics.median(r.get(key, 0.0) for r in setup.paced)

        paced_cpu = f"{median('service_cpu_us'):.0f}" if service_cpu else "—"

        print(
            f"| {setup.name} | {sat['rps']:.0f} | {sat['rps'] / base.saturation['rps']:.2f} "
            f"| {sum(r['non_2xx'] for r in (sat, setup.warm, setup.cold, *setup.paced)):.0f} "
            f"| {sat.get('envoy_cpu_us', 0):.0f} | {service_text} | {capacity} "
            f"| {median('rps'):.0f} | {median('p50_ms'):.2f} | {median('p90_ms'):.2f} "
            f"| {median('p99_ms'):.2f} | {statistics.median(added):.2f} "
            f"| {min(added):.2f} to {max(added):.2f} "
            f"| {setup.warm.get('p50_ms', 0):.2f} | {setup.cold.get('p50_ms', 0):.2f} "
            f"| {paced_cpu} |"
        )
    for setup in setups:
        if "redis_cpu_us" in setup.saturation:
            paced_redis = statistics.median(r.get("redis_cpu_us", 0.0) for r in setup.paced)
            print(
                f"\nRedis server CPU µs/req, {setup.name}: {setup.saturation['redis_cpu_us']:.0f} "
                f"at saturation, {paced_redis:.0f} paced"
            )
    charges = [setup.charged for setup in setups if setup.service is not None]
    if charges:
        # A ratio near 1 shows the rows paid for token charging; a few probes are not counted.
        ratios = ", ".join(f"{c:.2f}" for c in charges)
        print(f"\nusage charged per request sent, policy-engine rows in order: {ratios}")


if __name__ == "__main__":
    main()
