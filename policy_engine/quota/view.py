"""What the decision pipeline may know of quota counters: a read-only view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class CounterId:
    """One counter: a budget of a quota limit for one key value (e.g. one tenant)."""

    policy: str
    limit: str
    kind: str  # requests | input_tokens | output_tokens | total_tokens
    key: str

    def __str__(self) -> str:
        return f"{self.policy}/{self.limit}/{self.kind}/{self.key}"


@dataclass(slots=True)
class Usage:
    used: int = 0
    reset_s: float = 0.0  # seconds until enough of the window passes to free budget


class QuotaView(Protocol):
    def usage(self, counter: CounterId, window: float) -> Usage: ...


def parse_counter(text: str) -> CounterId | None:
    """The inverse of str(CounterId); names have no '/', the key may."""
    parts = text.split("/", 3)
    return CounterId(*parts) if len(parts) == 4 else None


class NoUsage:
    """Every counter at zero: the view of a fresh store."""

    def usage(self, counter: CounterId, window: float) -> Usage:
        return Usage(0, window)


class StaticUsage:
    """Fixed usage by `policy/limit` (any key), as policy tests state it."""

    def __init__(self, used: Mapping[str, Mapping[str, int]]) -> None:
        self._used = used

    def usage(self, counter: CounterId, window: float) -> Usage:
        by_kind = self._used.get(f"{counter.policy}/{counter.limit}", {})
        return Usage(int(by_kind.get(counter.kind, 0)), window)
