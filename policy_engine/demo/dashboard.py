"""The demo's screen: decisions per route, tenant and reason, the canary and the backends' health.

Client-side counts come from the traffic driver's tally; the canary weight and phase and the
backends' health come from the service's own Prometheus /metrics, so the screen shows what the
decisions saw. Without a terminal the same state is printed as plain lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from policy_engine.demo.outcomes import KINDS, Tally

_BACKEND_GAUGES = {
    "pe_telemetry_backend_healthy": "healthy",
    "pe_telemetry_backend_stale": "stale",
    "pe_telemetry_backend_latency_p99_ms": "latency_p99_ms",
    "pe_telemetry_backend_error_rate": "error_rate",
    "pe_telemetry_backend_inflight": "inflight",
    "pe_telemetry_backend_queue_depth": "queue_depth",
}


@dataclass
class BackendView:
    healthy: float = 1.0
    stale: float = 0.0
    latency_p99_ms: float = 0.0
    error_rate: float = 0.0
    inflight: float = 0.0
    queue_depth: float = 0.0


@dataclass
class CanaryView:
    weight: float | None = None
    phase: str = ""


@dataclass
class ServiceView:
    """What the service's /metrics said last time it was read."""

    backends: dict[str, BackendView] = field(default_factory=dict)
    canaries: dict[str, CanaryView] = field(default_factory=dict)
    controller: bool = False  # the canary controller exports its gauges
    reachable: bool = False
    bundle: str = ""  # version of the policies the service decides with
    reloads: dict[str, float] = field(default_factory=dict)  # result → count


def parse_metrics(text: str) -> ServiceView:
    view = ServiceView(reachable=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            attribute = _BACKEND_GAUGES.get(sample.name)
            if attribute and "backend" in labels:
                setattr(view.backends.setdefault(labels["backend"], BackendView()), attribute, sample.value)
            elif sample.name == "pe_canary_weight" and "policy" in labels:
                view.controller = True
                view.canaries.setdefault(labels["policy"], CanaryView()).weight = sample.value
            elif sample.name == "pe_bundle_info" and sample.value == 1:
                view.bundle = labels.get("version", "")
            elif sample.name == "pe_policy_reloads_total" and "result" in labels:
                view.reloads[labels["result"]] = sample.value
            elif sample.name == "pe_canary_phase" and sample.value == 1 and "policy" in labels:
                view.controller = True
                view.canaries.setdefault(labels["policy"], CanaryView()).phase = labels.get("phase", "")
    return view


@dataclass
class Screen:
    """Everything one frame shows."""

    tally: Tally
    events: list[tuple[float, str]]
    view: ServiceView
    elapsed: float
    duration: float
    gateway: str
    static_weights: dict[str, int] = field(default_factory=dict)  # canary weights in the policies


def _table(title: str, expand: bool = True) -> Table:
    return Table(box=box.SIMPLE_HEAD, show_edge=False, title=title, expand=expand)


def _kinds_table(tally: Tally) -> Table:
    table = _table(f"decisions ({tally.total} requests)")
    table.add_column("outcome", no_wrap=True)
    table.add_column("count", justify="right")
    for kind in KINDS:
        count = tally.kinds.get(kind, 0)
        if count or kind in ("allowed", "denied_access", "moderation_blocked", "quota_exceeded", "shed"):
            table.add_row(kind.replace("_", " "), str(count))
    return table


def _tenants_table(tally: Tally) -> Table:
    table = _table("per tenant")
    table.add_column("tenant", no_wrap=True)
    for heading in ("ok", "401/403", "blocked", "429", "shed", "other"):
        table.add_column(heading, justify="right", no_wrap=True)
    for tenant in sorted(tally.tenants):
        counts = tally.tenants[tenant]
        known = ("allowed", "denied_access", "moderation_blocked", "quota_exceeded", "shed")
        other = sum(v for k, v in counts.items() if k not in known)
        table.add_row(tenant, *(str(counts.get(k, 0)) for k in known), str(other))
    return table


def _reasons_table(tally: Tally, limit: int = 12) -> Table:
    table = _table("reasons")
    table.add_column("reason", no_wrap=True, overflow="ellipsis")
    table.add_column("count", justify="right")
    for reason, count in tally.reasons.most_common(limit):
        table.add_row(reason, str(count))
    return table


def _backends_table(tally: Tally, view: ServiceView) -> Table:
    table = _table("routes: answers per backend, and the backend as the service sees it")
    for heading in ("backend", "answers", "health", "p99 ms", "errors", "running", "queue"):
        table.add_column(heading, justify="left" if heading == "backend" else "right", no_wrap=True)
    for name in sorted(set(view.backends) | set(tally.backends)):
        stats = view.backends.get(name)
        if stats is None:
            table.add_row(name, str(tally.backends.get(name, 0)), "-", "-", "-", "-", "-")
            continue
        health = (
            Text("stale", style="yellow") if stats.stale else
            Text("ok", style="green") if stats.healthy else Text("ejected", style="red")
        )  # fmt: skip
        latency = "-" if math.isinf(stats.latency_p99_ms) else f"{stats.latency_p99_ms:.0f}"
        table.add_row(
            name,
            str(tally.backends.get(name, 0)),
            health,
            latency,
            f"{stats.error_rate:.0%}",
            f"{stats.inflight:.0f}",
            f"{stats.queue_depth:.0f}",
        )
    return table


def canary_lines(screen: Screen) -> list[str]:
    lines = []
    share = screen.tally.canary_share()
    served = screen.tally.canary["canary"] + screen.tally.canary["stable"]
    if screen.view.controller:
        for policy, canary in sorted(screen.view.canaries.items()):
            weight = "-" if canary.weight is None else f"{canary.weight:.0f}%"
            lines.append(f"canary {policy}: weight {weight}, phase {canary.phase or '-'}")
    else:
        static = ", ".join(f"{p} {w}%" for p, w in sorted(screen.static_weights.items())) or "none"
        note = "no service metrics yet" if not screen.view.reachable else "canary controller not available"
        lines.append(f"{note}: static weights from the policies ({static})")
    lines.append(f"observed canary share of eligible answers: {share:.0%} of {served}")
    return lines


def policy_line(view: ServiceView) -> str:
    ok, failed = view.reloads.get("ok", 0), view.reloads.get("error", 0)
    return f"policies: bundle {view.bundle or '-'} · reloads {ok:.0f} ok, {failed:.0f} rejected"


def _events_text(events: Iterable[tuple[float, str]], limit: int = 6) -> Text:
    recent = list(events)[-limit:]
    return Text("\n".join(f"{at:5.1f}s  {title}" for at, title in recent) or "-")


def render(screen: Screen) -> RenderableType:
    header = Text(
        f"policy-engine demo · gateway {screen.gateway} · {screen.elapsed:.0f}/{screen.duration:.0f}s "
        "· Ctrl-C stops",
        style="bold",
    )
    header.append(f"\n{policy_line(screen.view)}", style="")
    top = Table.grid(expand=True)
    top.add_column(ratio=1)
    top.add_column(ratio=1)
    top.add_row(_kinds_table(screen.tally), _reasons_table(screen.tally))
    return Group(
        header,
        top,
        _tenants_table(screen.tally),
        _backends_table(screen.tally, screen.view),
        Panel(Text("\n".join(canary_lines(screen))), title="canary", box=box.ROUNDED),
        Panel(_events_text(screen.events, limit=5), title="timeline", box=box.ROUNDED),
    )


def plain_line(screen: Screen) -> str:
    kinds = " ".join(f"{k}={screen.tally.kinds.get(k, 0)}" for k in KINDS if screen.tally.kinds.get(k, 0))
    canary = "; ".join(canary_lines(screen))
    bundle = screen.view.bundle or "-"
    return f"[{screen.elapsed:5.1f}s] requests={screen.tally.total} {kinds} | {canary} | bundle {bundle}"
