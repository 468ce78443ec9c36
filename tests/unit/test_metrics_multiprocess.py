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
