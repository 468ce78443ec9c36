"""What live telemetry adds to a decision: snapshots of 0, 12 and 50 backends, side by side.

Run: .venv/bin/python bench/telemetry.py [--iterations N]

The example bundle decides a premium chat request (its route scores two H100 backends). Rows:
- no telemetry: an empty snapshot (every backend unknown, so the route finds none: 503);
- 12 / 50 backends: one snapshot reused, as the hub serves it between refreshes (every 0.25 s);
- 50 backends, new snapshot every decision: the worst case, the CEL message rebuilt each time;
- the hub's own costs: `snapshot()` between refreshes, and a rebuild of 50 backends.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decision import BACKENDS, SCENARIOS, VARIANTS, measure  # noqa: E402
from policy_engine.decide.pipeline import Pipeline  # noqa: E402
from policy_engine.policy.compiler import load_bundle  # noqa: E402
from policy_engine.telemetry.hub import BackendSpec, TelemetryHub  # noqa: E402
from policy_engine.telemetry.observations import RequestObservation  # noqa: E402
from policy_engine.telemetry.snapshot import EMPTY_SNAPSHOT, BackendStats, TelemetrySnapshot  # noqa: E402


def median_us(fn: Callable[[int], object], iterations: int) -> float:
    return statistics.median(measure(fn, iterations))


def snapshot(count: int, version: int = 0) -> TelemetrySnapshot:
    names = (
        BACKENDS + [f"extra-{i}" for i in range(count - len(BACKENDS))] if count > len(BACKENDS) else BACKENDS
    )
    return TelemetrySnapshot(
        {
            name: BackendStats(name, queue_depth=i % 5, latency_p99_ms=200.0 + i)
            for i, name in enumerate(names)
        },
        version=version,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    pipeline = Pipeline(load_bundle(ROOT / "policies"))
    requests = SCENARIOS["premium chat (H100 route)"]
    small, large = snapshot(12), snapshot(50)
    fresh = [snapshot(50, version=v) for v in range(VARIANTS)]

    def decide(snap: TelemetrySnapshot) -> Callable[[int], object]:
        return lambda i: pipeline.decide(requests[i % VARIANTS], snap)

    rows = [
        ("no telemetry (empty snapshot)", median_us(decide(EMPTY_SNAPSHOT), args.iterations)),
        ("12 backends, snapshot reused", median_us(decide(small), args.iterations)),
        ("50 backends, snapshot reused", median_us(decide(large), args.iterations)),
        (
            "50 backends, new snapshot every decision",
            median_us(
                lambda i: pipeline.decide(requests[i % VARIANTS], fresh[i % VARIANTS]), args.iterations
            ),
        ),
    ]
    hub = TelemetryHub([BackendSpec(name) for name in large.backends], refresh_s=3600)
    for name in large.backends:
        hub.observe(RequestObservation(name, 200, latency_ms=100.0))
    hub.snapshot(force=True)
    rows.append(("hub.snapshot() between refreshes", median_us(lambda i: hub.snapshot(), args.iterations)))
    rows.append(("hub rebuild of 50 backends", median_us(lambda i: hub.snapshot(force=True), 300)))

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"machine: {platform.machine()} cores={os.cpu_count()} python={platform.python_version()} "
        f"load={os.getloadavg()[0]:.2f}\n"
    )
    print("| case | median µs | vs 12 backends reused |")
    print("|---|---:|---:|")
    base = rows[1][1]
    for name, value in rows:
        print(f"| {name} | {value:.1f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
