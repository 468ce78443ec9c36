"""Fuzzing policy files: mutated copies of the examples load or fail with located errors, never crash."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.policy.compiler import NO_ACCESS_POLICY, BundleError, load_bundle
from policy_engine.policy.source import SourceError

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml") if not p.name.endswith("_test.yaml"))
NOISE = [
    ":",
    "-",
    " ",
    '"',
    "'",
    "{",
    "}",
    "[",
    "(",
    ")",
    "&",
    "|",
    "x",
    "\t",
    "\n",
    "#",
    "*",
    "!",
    "%",
    "\x00",
]
LOCATED = re.compile(r"\.yaml:\d+:\d+: ")


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(FILES))
    text = (EXAMPLES / name).read_text()
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["delete", "duplicate", "character", "truncate", "swap", "indent"]))
        at = draw(st.integers(0, max(len(lines) - 1, 0)))
        if kind == "delete":
            del lines[at]
        elif kind == "duplicate":
            lines.insert(at, lines[at])
        elif kind == "swap" and at + 1 < len(lines):
            lines[at], lines[at + 1] = lines[at + 1], lines[at]
        elif kind == "indent":
            lines[at] = draw(st.sampled_from(["  ", " ", "\t"])) + lines[at]
        text = "\n".join(lines)
        if kind == "character" and text:
            position = draw(st.integers(0, len(text) - 1))
            text = text[:position] + draw(st.sampled_from(NOISE)) + text[position + 1 :]
        elif kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
    return name, text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=mutations())
def test_a_mutated_policy_loads_or_fails_with_located_errors(mutation: tuple[str, str]) -> None:
    name, text = mutation
    directory = Path(tempfile.mkdtemp(prefix="pe-fuzz-"))
    try:
        for other in FILES:
            shutil.copy(EXAMPLES / other, directory / other)
        (directory / name).write_text(text)
        try:
            bundle = load_bundle(directory)
        except (BundleError, SourceError) as error:
            assert error.issues, "an error without issues"
            for issue in error.issues:
                located = str(issue)
                if issue.message == NO_ACCESS_POLICY:  # what is missing: the directory's, not a line's
                    assert issue.position.file == str(directory) and name == "access.yaml", located
                    continue
                assert LOCATED.search(located) and "\n" not in located, located
                assert issue.position.line >= 1 and issue.position.column >= 1, located
        else:
            assert bundle.version
    finally:
        shutil.rmtree(directory)
