"""`policy-engine demo` as a user runs it: a real Envoy, the service and the simulated backends as
child processes, mixed traffic, a summary at the end, and no process left behind however the run
ends (its duration, Ctrl-C, SIGTERM)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from policy_engine.demo.outcomes import REQUIRED_KINDS
from tests.e2e.harness import ROOT, wait_until


def demo(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "policy_engine", "demo", "--no-dashboard", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # Its own session: the signals a test sends reach the demo only, as a terminal's Ctrl-C would.
        start_new_session=True,
    )


def children(workdir: Path) -> dict[str, int]:
    return {str(k): int(v) for k, v in json.loads((workdir / "pids.json").read_text())["children"].items()}


def gateway_requests(workdir: Path) -> int:
    admin = (workdir / "envoy-admin").read_text().strip()
    url = f"http://{admin}/stats?format=json&filter=downstream_rq_total"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.loads(response.read())["stats"]
    return sum(int(s["value"]) for s in stats if s["name"].endswith("downstream_rq_total"))


def processes_mentioning(text: str) -> list[str]:
    """Every running process whose command line contains `text` (each child names the work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        if text in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


def assert_nothing_left(workdir: Path, pids: dict[str, int]) -> None:
    assert set(pids) == {"backends", "service", "envoy"}
    for name, pid in pids.items():
        proc = Path(f"/proc/{pid}")
        # A recycled pid would belong to some other command: the child's names the work dir.
        running = proc.exists() and str(workdir) in (proc / "cmdline").read_text(errors="replace")
        assert not running, f"{name} (pid {pid}) is still running"
    assert processes_mentioning(str(workdir)) == []


def test_demo_runs_and_every_kind_of_decision_happens(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    summary_file = tmp_path / "summary.json"
    process = demo(workdir, "--duration", "20", "--port", "0", "--json-summary", str(summary_file))
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "every kind of decision happened" in stdout, stdout
    summary = json.loads(summary_file.read_text())
    assert summary["completed"] is True
    for kind in REQUIRED_KINDS:
        assert summary["kinds"][kind] > 0, (kind, summary["kinds"])
    assert summary["missing"] == []
    # Denials of each stage carry the reason codes of the example policies.
    reasons = ("invalid_api_key", "missing_api_key", "prompt_injection", "rate_limit_exceeded", "overloaded")
    for reason in reasons:
        assert summary["reasons"].get(reason, 0) > 0, (reason, summary["reasons"])
    # Routing: chat, embeddings, images and audio each reached their own backends, and the canary served.
    for backend in ("embed-a", "sdxl", "whisper", "llama-70b-eu", "llama-70b-v2"):
        assert summary["backends"].get(backend, 0) > 0, (backend, summary["backends"])
    assert summary["backends"].get("llama-8b-a", 0) + summary["backends"].get("llama-8b-b", 0) > 0
    assert 0 < summary["canary_share"] < 1
    assert summary["tenants"]["hobbyist"].get("quota_exceeded", 0) > 0
    # The decision log and the traces are where the summary says.
    assert summary["decision_log"] and summary["decision_log_lines"] > 0
    first = json.loads(Path(summary["decision_log"]).read_text().splitlines()[0])
    assert isinstance(first, dict)
    assert summary["traces"] and summary["trace_spans"] > 0
    assert f"decision log: {summary['decision_log']}" in stdout
    pids = children(workdir)
    assert sorted(summary["children"].items()) == sorted(pids.items())
    assert len(summary["stopped"]) == 3, summary["stopped"]
    assert_nothing_left(workdir, pids)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_the_demo_stops_every_child(tmp_path: Path, signum: int) -> None:
    workdir = tmp_path / "demo"
    process = demo(workdir, "--duration", "300", "--port", "0")
    try:
        wait_until(lambda: len(children(workdir)) == 3, 120, "the demo's three children")
        wait_until(lambda: gateway_requests(workdir) > 20, 60, "traffic through Envoy")
        pids = children(workdir)
        for pid in pids.values():
            assert Path(f"/proc/{pid}").exists()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "== summary (interrupted" in stdout
    assert "stopped: envoy" in stdout
    assert_nothing_left(workdir, pids)


def test_a_taken_port_gives_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workdir = tmp_path / "demo"
        process = demo(workdir, "--duration", "5", "--port", str(port))
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"port {port} is taken (use --port PORT, or --port 0 for any free port)" in stderr
    assert not workdir.exists()


def test_a_killed_demo_takes_its_children_with_it(tmp_path: Path) -> None:
    """SIGKILL gives the demo no chance to clean up: the kernel signals its children instead."""
    workdir = tmp_path / "demo"
    process = demo(workdir, "--duration", "300", "--port", "0")
    try:
        wait_until(lambda: len(children(workdir)) == 3, 120, "the demo's three children")
        wait_until(lambda: gateway_requests(workdir) > 0, 60, "traffic through Envoy")
        pids = children(workdir)
        process.kill()
        process.communicate(timeout=30)
        wait_until(lambda: processes_mentioning(str(workdir)) == [], 60, "the children to exit")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert_nothing_left(workdir, pids)
