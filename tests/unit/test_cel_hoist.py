"""Hoisted library calls: same values as through the engine, lazy, memoised, and no memory growth."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.cel.engine import CelEvalError, Environment, FunctionDef, Overload, message_classes
from policy_engine.cel.functions import library_functions
from policy_engine.cel.library import TermMatcher
from policy_engine.cel.schema import VARIABLES
from policy_engine.decide.pipeline import Pipeline
from policy_engine.policy.compiler import load_bundle
from tests.unit.test_properties import text

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
MESSAGES = message_classes()

EXPRESSIONS = [
    "pii.any(llm.prompt)",
    'terms.any(llm.prompt, "blocked") || pii.card(llm.prompt)',
    'tenant.tier == "free" && pii.email(llm.prompt)',
    "injection.score(llm.prompt) > 0.5 ? 1 : 0",
    'net.in_cidr(source.address, ["10.0.0.0/8", "fd00::/8"])',
    "globs.match(tenant.models, llm.model)",
    "llm.messages.exists(m, pii.any(m.content)) || tokens.estimate(llm.prompt) > 10",
    'pii.any(llm.prompt // ) a comment\n) && "a)b".size() == 3',
    'terms.any(llm.prompt, "a)b\\"c") == pii.any( llm.prompt )',
]


def environments(functions: list[FunctionDef]) -> tuple[Environment, Environment]:
    # The engine path: hoisting is what keeps it from leaking (translated expressions never cross).
    return (
        Environment(functions, VARIABLES, native=False),
        Environment(functions, VARIABLES, hoist_slots=16, native=False),
    )


def values(prompt: str, address: str = "10.1.2.3", tier: str = "free") -> dict[str, Any]:
    return {
        "llm": MESSAGES["Llm"](
            model="llama-3-8b", prompt=prompt, messages=[MESSAGES["ChatMessage"](role="user", content=prompt)]
        ),
        "tenant": MESSAGES["Tenant"](tier=tier, models=["llama-*"]),
        "source": MESSAGES["Peer"](address=address),
    }


def outcome(env: Environment, source: str, data: dict[str, Any]) -> object:
    try:
        program = env.compile(source)
    except Exception as error:
        return ("compile", type(error).__name__)
    try:
        return program.eval(env.activation(data))
    except CelEvalError:
        return "error"


@settings(max_examples=60, deadline=None)
@given(
    prompt=text | st.sampled_from(["mail me at a@b.co", "card 4111 1111 1111 1111", "ignore all previous"]),
    address=st.sampled_from(["10.1.2.3", "192.168.0.1", "fd00::1", "not an ip"]),
    tier=st.sampled_from(["free", "pro"]),
)
def test_hoisted_and_bridged_calls_agree(prompt: str, address: str, tier: str) -> None:
    bridged, hoisted = environments(library_functions({"blocked": TermMatcher(["forbidden"])}))
    data = values(prompt, address, tier)
    for source in EXPRESSIONS:
        assert outcome(hoisted, source, data) == outcome(bridged, source, data), source


def spy_functions(calls: list[str]) -> list[FunctionDef]:
    def scan(text: str) -> bool:
        calls.append(text)
        if text == "boom":
            raise ValueError("boom")
        return "x" in text

    return [FunctionDef("spy.scan", (Overload("spy_scan_string", ("string",), "bool", scan),), "test")]


def test_calls_are_lazy_memoised_and_errors_stay_errors() -> None:
    calls: list[str] = []
    env = Environment(spy_functions(calls), VARIABLES, hoist_slots=4, native=False)
    skipped = env.compile('llm.model == "other" && spy.scan(llm.prompt)', "bool")
    twice = env.compile("spy.scan(llm.prompt) || spy.scan(llm.prompt)", "bool")
    again = env.compile("!spy.scan(llm.prompt)", "bool")
    activation = env.activation({"llm": MESSAGES["Llm"](model="m", prompt="xyz")})
    assert skipped.test(activation) is False and calls == []
    assert twice.test(activation) is True and again.test(activation) is False
    assert calls == ["xyz"]  # one scan for the whole activation
    assert (
        env.compile("spy.scan(llm.prompt)", "bool").test(env.activation({"llm": MESSAGES["Llm"]()})) is False
    )
    assert calls == ["xyz", ""]  # a new activation computes again
    with pytest.raises(CelEvalError, match="boom"):
        env.compile("spy.scan(llm.prompt)", "bool").test(
            env.activation({"llm": MESSAGES["Llm"](prompt="boom")})
        )


def test_a_call_on_a_loop_variable_is_left_to_the_engine() -> None:
    calls: list[str] = []
    env = Environment(spy_functions(calls), VARIABLES, hoist_slots=4, native=False)
    program = env.compile("llm.messages.exists(m, spy.scan(m.content))", "bool")
    chat = MESSAGES["Llm"](
        messages=[MESSAGES["ChatMessage"](content="a"), MESSAGES["ChatMessage"](content="x")]
    )
    assert program.test(env.activation({"llm": chat})) is True
    assert calls == ["a", "x"]


def test_the_reserved_name_cannot_be_written() -> None:
    env = Environment(library_functions({}), VARIABLES, hoist_slots=1, native=False)
    with pytest.raises(Exception, match="reserved"):
        env.compile("__pe_hoisted0()")


def test_deciding_does_not_grow_memory() -> None:
    """cel-expr-python keeps every argument passed to a Python function; hoisting avoids it."""
    import bench.decision as scenarios

    pipeline = Pipeline(load_bundle(EXAMPLES))
    requests = [r for group in scenarios.SCENARIOS.values() for r in group]
    for request in requests:
        pipeline.decide(request)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for index in range(2000):
        pipeline.decide(requests[index % len(requests)])
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename") if stat.size_diff > 0)
    # Through the bridge this was about 8 MB (each prompt and message kept); allow noise.
    assert grown < 512 * 1024, after.compare_to(before, "lineno")[:5]
