"""With --workers > 1 metrics go through prometheus_client's multiprocess mode, where remove() does
nothing: the previous bundle version must still stop reading 1. (The mode is chosen when
prometheus_client is imported, so a fresh interpreter runs the workers' side.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = """
from prometheus_client import CollectorRegistry
from policy_engine.audit.metrics import Metrics
metrics = Metrics(CollectorRegistry())
metrics.set_bundle("aaaa")
metrics.reloaded(True, "bbbb", 1.0)
"""

PARENT = """
import json, sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
print(json.dumps({
    s.labels["version"]: s.value
    for f in text_string_to_metric_families(generate_latest(registry).decode())
    if f.name == "pe_bundle_info" for s in f.samples
}))
"""


def test_only_the_active_bundle_reads_one(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", PARENT, str(tmp_path)], env=env, check=True, timeout=60, capture_output=True
    ).stdout
    values = json.loads(out)
    assert values.get("bbbb") == 1.0, values
    assert values.get("aaaa", 0.0) == 0.0, values


TELEMETRY_WORKER = """
from prometheus_client import CollectorRegistry
from policy_engine.telemetry.hub import TelemetryHub
from policy_engine.telemetry.metrics import MultiprocessTelemetry, TelemetryCollector
from policy_engine.telemetry.observations import RequestObservation
hub = TelemetryHub(["a", "b"])
mirror = MultiprocessTelemetry(TelemetryCollector(hub), CollectorRegistry())
hub.observe(RequestObservation("a", 200, latency_ms=50.0))
hub.observe(RequestObservation("a", 503, connect_failure=True))
hub.snapshot(force=True)
mirror.refresh()
hub.observe(RequestObservation("a", 200, latency_ms=40.0))
hub.snapshot(force=True)
mirror.refresh()
mirror.refresh()  # nothing new: the counters must not grow
"""

TELEMETRY_PARENT = """
import json, sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
print(json.dumps([
    [s.name, s.labels, s.value]
    for f in text_string_to_metric_families(generate_latest(registry).decode())
    if f.name.startswith("pe_telemetry") for s in f.samples
]))
"""


def test_each_worker_exports_its_telemetry_and_the_counters_add_up(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):  # two workers, each with its own hub
        subprocess.run([sys.executable, "-c", TELEMETRY_WORKER], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", TELEMETRY_PARENT, str(tmp_path)],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
    ).stdout
    samples = json.loads(out)

    def values(name: str, **labels: str) -> list[float]:
        return [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]

    # Gauges: one series per worker process and backend.
    assert len({ls["pid"] for n, ls, _ in samples if n == "pe_telemetry_backend_healthy"}) == 2
    assert sorted(values("pe_telemetry_backend_healthy", backend="a")) == [1.0, 1.0]
    assert len(values("pe_telemetry_backend_stale", backend="b")) == 2
    assert len(values("pe_telemetry_snapshot_version")) == 2
    # Counters: totals summed over the workers, each request counted once.
    assert values("pe_telemetry_backend_requests_total", backend="a") == [6.0]
    assert values("pe_telemetry_backend_errors_total", backend="a") == [2.0]
    assert values("pe_telemetry_backend_requests_total", backend="b") in ([], [0.0])


GLITCHING_WORKER = """
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from policy_engine.telemetry.metrics import MultiprocessTelemetry

class Totals:
    def __init__(self): self.values = {"idle": 0.0, "busy": 0.0}
    def collect(self):
        family = CounterMetricFamily("pe_test_events", "Events.", labels=["kind"])
        for kind, value in self.values.items():
            family.add_metric([kind], value)
        yield family

totals = Totals()
mirror = MultiprocessTelemetry(totals, CollectorRegistry())
for busy in (10.0, 7.0, 12.0):  # a total read low once (a count in flight) must add nothing
    totals.values["busy"] = busy
    mirror.refresh()
"""


def test_mirrored_counters_never_add_a_total_twice_and_start_at_zero(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", GLITCHING_WORKER], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", TELEMETRY_PARENT.replace("pe_telemetry", "pe_test"), str(tmp_path)],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
    ).stdout
    totals = {labels["kind"]: value for name, labels, value in json.loads(out) if name.endswith("_total")}
    assert totals == {"busy": 12.0, "idle": 0.0}
