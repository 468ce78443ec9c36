"""Reading decision logs back: parse lines, filter by tenant, rule, decision and time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from policy_engine.audit.decision_log import RECORD_TYPE

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class LogQueryError(ValueError):
    """A query the user must fix (bad time, unreadable file)."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when no offset is given) or a time ago: `-10m`, `2h`, `30s`, `1d`."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LogQueryError(f"not a time: {text!r} (use ISO 8601, 2026-01-31T12:00:00Z, or -10m)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Query:
    tenant: str | None = None
    rule: str | None = None  # policy/rule, or a policy name for any of its rules
    decision: str | None = None  # allow | deny
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        if self.tenant is not None and record.get("tenant") != self.tenant:
            return False
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.rule is not None:
            fired = [f.get("rule", "") for f in record.get("fired", []) if isinstance(f, dict)]
            if not any(r == self.rule or r.split("/", 1)[0] == self.rule for r in fired):
                return False
        if self.since is not None or self.until is not None:
            try:
                when = parse_time(str(record.get("time", "")))
            except LogQueryError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        return True


@dataclass(frozen=True)
class Skipped:
    line: int
    reason: str


def read_records(lines: Iterable[str], skipped: list[Skipped] | None = None) -> Iterator[dict[str, Any]]:
    """Decision records in order; lines that are not (a torn last line, other output on stdout)
    are reported in `skipped`, never fatal."""
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except ValueError:
            if skipped is not None:
                skipped.append(Skipped(number, "not JSON"))
            continue
        if not isinstance(record, dict) or record.get("type") != RECORD_TYPE:
            if skipped is not None:
                skipped.append(Skipped(number, "not a decision record"))
            continue
        yield record


def open_log(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            yield from lines
    except OSError as error:
        raise LogQueryError(f"cannot read {path}: {error.strerror or error}") from None


def find_request(path: Path, request_id: str) -> dict[str, Any] | None:
    """The last record of that request id (a retried request id keeps its latest decision)."""
    found = None
    for record in read_records(open_log(path)):
        if record.get("request_id") == request_id:
            found = record
    return found
