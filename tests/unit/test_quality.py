"""The package stays ruff- and mypy --strict-clean: part of the test command, so CI enforces it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_clean() -> None:
    result = tool("ruff", "check", "policy_engine", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = tool("mypy", "--strict", "policy_engine")
    assert result.returncode == 0, result.stdout + result.stderr
