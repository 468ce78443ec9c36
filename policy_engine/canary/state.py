"""What a rollout is at one moment: phase, step, weight, the step's traffic, and its history.

A `RolloutState` is plain data: the machine derives new states from it, the stores persist it
as JSON, the CLI prints it. Times are wall-clock seconds (epoch), so a state read after a
restart (or by another process) means the same thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

Phase = Literal["progressing", "promoted", "rolled_back", "inconclusive", "aborted"]
PHASES: tuple[Phase, ...] = get_args(Phase)
TERMINAL: frozenset[Phase] = frozenset({"promoted", "rolled_back", "aborted"})
Command = Literal["promote", "abort", "restart"]
COMMANDS: tuple[Command, ...] = get_args(Command)
HISTORY_LIMIT = 50  # transitions kept per rollout; older ones live in the logs and traces


@dataclass(frozen=True)
class Counts:
    """Requests and failed requests (5xx, connect failures) of the stable and canary backends."""

    canary_requests: int = 0
    canary_errors: int = 0
    stable_requests: int = 0
    stable_errors: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.canary_requests + other.canary_requests,
            self.canary_errors + other.canary_errors,
            self.stable_requests + other.stable_requests,
            self.stable_errors + other.stable_errors,
        )


@dataclass(frozen=True)
class Transition:
    """One change of phase or weight, with the reason it happened."""

    at: float
    policy: str
    from_phase: Phase
    to_phase: Phase
    from_weight: int
    to_weight: int
    step: int
    reason: str
    canary_requests: int = 0
    analysis: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutState:
    policy: str
    revision: str  # fingerprint of stable, canary and steps: a new rollout when they change
    phase: Phase
    step: int  # index into the rollout's steps
    weight: int  # percent of eligible traffic sent to the canary
    step_started_at: float
    interval_started_at: float
    short_intervals: int = 0  # intervals of this step that ended without min_requests
    window: Counts = field(default_factory=Counts)  # traffic of this step so far
    source: str = ""  # the counter source `seen` came from
    seen: Counts = field(default_factory=Counts)  # its cumulative counters at the last tick
    last_analysis: str = ""
    updated_at: float = 0.0
    history: tuple[Transition, ...] = ()

    def with_transition(self, transition: Transition, **changes: Any) -> RolloutState:
        history = (*self.history, transition)[-HISTORY_LIMIT:]
        return replace(self, history=history, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutState:
        """Parse a stored state; ValueError (with what is wrong) on anything malformed."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            data["window"] = Counts(**data.get("window", {}))
            data["seen"] = Counts(**data.get("seen", {}))
            data["history"] = tuple(Transition(**t) for t in data.get("history", ()))
            state = cls(**data)
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"malformed rollout state: {error}") from None
        if state.phase not in PHASES:
            raise ValueError(f"malformed rollout state: unknown phase {state.phase!r}")
        return state


def revision(stable: str, canary: str, steps: list[int] | tuple[int, ...]) -> str:
    text = json.dumps([stable, canary, list(steps)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
