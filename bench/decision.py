"""Time of one full decision over the example bundle (all stages, all policies).

Run: .venv/bin/python bench/decision.py [--iterations N] [--rounds R] [--policies DIR] [--pauses-ms 1,10]

Each scenario is a realistic request (20 headers, a chat body of 10 messages of ~200 characters)
decided by `Pipeline.decide` with a telemetry snapshot of the example backends. The decision is
pure CPU work in one thread; the numbers are per call, in microseconds. A no-op baseline (the
same loop calling a function that returns a constant) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy_engine.decide.attributes import Peer, RequestAttributes  # noqa: E402
from policy_engine.decide.pipeline import Pipeline  # noqa: E402
from policy_engine.policy.compiler import load_bundle  # noqa: E402
from policy_engine.quota.view import NoUsage  # noqa: E402
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot  # noqa: E402

KEYS = {
    "premium": "Bearer sk-acme-premium-key-0001",
    "pro": "Bearer sk-globex-pro-key-0002",
    "free": "Bearer sk-hobby-free-key-0003",
}
BACKENDS = [
    *("llama-70b-a100-a", "llama-70b-a100-b", "llama-70b-h100-a", "llama-70b-h100-b", "llama-70b-v2"),
    *("llama-70b-eu", "llama-8b-a", "llama-8b-b", "embed-a", "embed-b", "sdxl", "whisper"),
]
VARIANTS = 64  # distinct prompts and users per scenario, so no cache can serve a repeat
SENTENCE = "The gateway routes each request to the least loaded backend that serves the model. "


def request(tier: str, path: str, body: dict[str, Any]) -> RequestAttributes:
    headers = {f"x-custom-{i}": f"value-{i}-" + "v" * 20 for i in range(17)}
    headers.update(
        {"authorization": KEYS[tier], "content-type": "application/json", "user-agent": "bench/1.0"}
    )
    return RequestAttributes(
        method="POST",
        path=path,
        host="ai.example.com",
        scheme="https",
        id="bench",
        headers=headers,
        body=json.dumps(body).encode(),
        source=Peer(principal="spiffe://cluster.local/ns/gw/sa/ingress", address="10.0.0.7"),
    )


def chat_body(model: str, user: str, variant: int) -> dict[str, Any]:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"#{variant}.{i} " + (SENTENCE * 3)[:195]}
        for i in range(10)
    ]
    return {"model": model, "user": user, "max_tokens": 256, "messages": messages}


def variants(tier: str, path: str, body: Callable[[int], dict[str, Any]]) -> list[RequestAttributes]:
    return [request(tier, path, body(v)) for v in range(VARIANTS)]


SCENARIOS: dict[str, list[RequestAttributes]] = {
    "pro chat (canary, quota, route)": variants(
        "pro", "/v1/chat/completions", lambda v: chat_body("llama-3-70b", f"u{v}", v)
    ),
    "premium chat (H100 route)": variants(
        "premium", "/v1/chat/completions", lambda v: chat_body("llama-3-70b", f"u{v}", v)
    ),
    "free chat small model": variants(
        "free", "/v1/chat/completions", lambda v: chat_body("llama-3-8b-instruct", "", v)
    ),
    "pro embeddings": variants(
        "pro",
        "/v1/embeddings",
        lambda v: {"model": "text-embedding-3-small", "input": [f"{v} {SENTENCE}"] * 8},
    ),
    "denied: model not in plan": variants(
        "free", "/v1/chat/completions", lambda v: chat_body("llama-3-70b", "", v)
    ),
}


def measure(fn: Callable[[int], object], iterations: int) -> list[float]:
    for i in range(min(500, iterations)):
        fn(i)
    samples = []
    for i in range(iterations):
        start = time.perf_counter_ns()
        fn(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2000, help="decisions per scenario and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default=str(ROOT / "policies"))
    parser.add_argument("--json", dest="json_file", help="write raw results here")
    parser.add_argument(
        "--pauses-ms",
        default="1,10",
        help="also time one scenario with the process asleep this long before each decision "
        "(comma-separated; 1 ms is a worker at ~1,000 requests/s); empty to skip",
    )
    parser.add_argument("--pause-iterations", type=int, default=300)
    args = parser.parse_args()

    bundle = load_bundle(args.policies)
    pipeline = Pipeline(bundle)
    snapshot = TelemetrySnapshot(
        {
            name: BackendStats(
                name, queue_depth=i % 4, kv_cache_usage=0.1 * (i % 7), latency_p99_ms=300.0 + i
            )
            for i, name in enumerate(BACKENDS)
        }
    )
    quota = NoUsage()

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()} "
        f"python={platform.python_version()}"
    )
    print(f"bundle: {bundle.version}, {len(bundle.policies())} policies, {len(bundle.rule_ids())} rules\n")

    baseline = measure(lambda i: None, args.iterations)
    decisions = {name: pipeline.decide(requests[0], snapshot, quota) for name, requests in SCENARIOS.items()}
    # Rounds interleave the scenarios, so a burst of noise from a neighbour on this shared machine
    # lands in one round of every scenario instead of in all of one.
    per_round: dict[str, list[list[float]]] = {name: [] for name in SCENARIOS}
    for _ in range(args.rounds):
        for name, requests in SCENARIOS.items():
            per_round[name].append(
                measure(
                    lambda i, requests=requests: pipeline.decide(requests[i % VARIANTS], snapshot, quota),  # type: ignore[misc]
                    args.iterations,
                )
            )
    results: dict[str, dict[str, float]] = {}
    print("| scenario | decision | median µs | p90 µs | p99 µs | round medians µs |")
    print("|---|---|---:|---:|---:|---|")
    all_samples: list[float] = []
    for name, rounds in per_round.items():
        samples = [x for round_samples in rounds for x in round_samples]
        all_samples.extend(samples)
        decision = decisions[name]
        outcome = (
            f"allow → {decision.route}" if decision.allowed else f"deny {decision.status} {decision.reason}"
        )
        results[name] = {
            "median_us": statistics.median(samples),
            "p90_us": percentile(samples, 0.9),
            "p99_us": percentile(samples, 0.99),
        }
        r = results[name]
        medians = " / ".join(f"{statistics.median(x):.0f}" for x in rounds)
        quantiles = f"{r['median_us']:.1f} | {r['p90_us']:.1f} | {r['p99_us']:.1f}"
        print(f"| {name} | {outcome} | {quantiles} | {medians} |")
    overall = statistics.median(all_samples)
    print(
        f"\nall scenarios: median {overall:.1f} µs per decision (no-op loop baseline "
        f"{statistics.median(baseline):.2f} µs; {args.rounds} rounds of {args.iterations} iterations each)"
    )
    pauses = [float(p) for p in args.pauses_ms.split(",") if p.strip()]
    if pauses:
        # A server at moderate load sleeps between requests, and a decision after a pause runs
        # with cold caches: this is the figure that meets a request in situ.
        name = "pro chat (canary, quota, route)"
        requests = SCENARIOS[name]
        print(
            f"\n{name}, the process asleep before each decision ({args.pause_iterations} decisions each):\n"
        )
        print("| pause before each decision | median µs | p90 µs |")
        print("|---|---:|---:|")
        warm = [x for round_samples in per_round[name] for x in round_samples]
        print(f"| none (the table above) | {statistics.median(warm):.1f} | {percentile(warm, 0.9):.1f} |")
        for pause in pauses:
            samples = []
            for i in range(args.pause_iterations):
                time.sleep(pause / 1000)
                start = time.perf_counter_ns()
                pipeline.decide(requests[i % VARIANTS], snapshot, quota)
                samples.append((time.perf_counter_ns() - start) / 1000)
            results[f"{name} after {pause:g} ms"] = {
                "median_us": statistics.median(samples),
                "p90_us": percentile(samples, 0.9),
            }
            print(f"| {pause:g} ms | {statistics.median(samples):.1f} | {percentile(samples, 0.9):.1f} |")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({"scenarios": results, "median_us": overall}, indent=2))


if __name__ == "__main__":
    main()
