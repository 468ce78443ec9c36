"""Decision semantics: order, deny-overrides, dry run, on_error, quotas, canary, metadata."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from policy_engine.decide.attributes import Peer, RequestAttributes, parse_body
from policy_engine.decide.decision import QuotaCheck
from policy_engine.decide.pipeline import Pipeline
from policy_engine.decide.quota import outcome, quota_headers, settle, store_failed, token_metadata
from policy_engine.policy.compiler import load_bundle
from policy_engine.quota.store import CounterState
from policy_engine.quota.view import CounterId, StaticUsage, Usage
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

HEADER = "apiVersion: policy-engine/v1\n"
TENANTS = (
    HEADER
    + """kind: TenantSet
metadata: {name: tenants}
spec:
  tenants:
    - id: t1
      tier: free
      principals: [spiffe://cluster.local/ns/a/sa/b]
"""
)


def chat(content: str = "hello", **body: object) -> RequestAttributes:
    payload = {"model": "m", "messages": [{"role": "user", "content": content}], **body}
    return RequestAttributes(
        method="POST",
        path="/v1/chat/completions",
        headers={"content-type": "application/json"},
        body=json.dumps(payload).encode(),
        source=Peer(principal="spiffe://cluster.local/ns/a/sa/b", address="10.1.2.3"),
    )


def pipeline(tmp_path: Path, *documents: str) -> Pipeline:
    (tmp_path / "tenants.yaml").write_text(TENANTS)
    for index, text in enumerate(documents):
        (tmp_path / f"p{index}.yaml").write_text(HEADER + text)
    return Pipeline(load_bundle(tmp_path))


def access(name: str, rules: str, extra: str = "") -> str:
    return f"kind: AccessPolicy\nmetadata: {{name: {name}}}\nspec:\n{extra}  rules:\n{rules}"


ALLOW_ALL = "    - {name: all, effect: allow, when: 'true'}\n"


def test_principal_tenant_and_spiffe_parts(tmp_path: Path) -> None:
    p = pipeline(
        tmp_path,
        access(
            "a",
            "    - {name: ns, effect: allow,\n"
            '       when: \'source.namespace == "a" && source.service_account == "b"\'}\n',
        ),
    )
    decision = p.decide(chat())
    assert decision.allowed and decision.tenant == "t1"
    assert decision.upstream_headers["x-pe-tenant"] == "t1"


def test_deny_overrides_allow_across_policies(tmp_path: Path) -> None:
    p = pipeline(
        tmp_path,
        access("first", ALLOW_ALL),
        access(
            "second",
            "    - {name: no, effect: deny, when: 'llm.model == \"m\"', status: 451, reason: nope}\n",
        ),
    )
    decision = p.decide(chat())
    assert not decision.allowed and decision.status == 451 and decision.reason == "nope"
    assert decision.fired_ids() == ["first/all", "second/no"]
    assert decision.upstream_headers == {}


def test_default_deny_when_nothing_fires(tmp_path: Path) -> None:
    p = pipeline(tmp_path, access("a", "    - {name: never, effect: allow, when: 'false'}\n"))
    decision = p.decide(chat())
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "access_denied")


def test_dry_run_records_but_does_not_deny(tmp_path: Path) -> None:
    rules = "    - {name: no, effect: deny, when: 'true'}\n"
    p = pipeline(tmp_path, access("a", ALLOW_ALL), access("trial", rules, "  mode: dry_run\n"))
    decision = p.decide(chat())
    assert decision.allowed
    assert [f.id for f in decision.dry_run] == ["trial/no"]
    assert all(f.dry_run for f in decision.fired if f.policy == "trial")


def test_on_error_deny_fails_closed(tmp_path: Path) -> None:
    rules = '    - {name: header, effect: allow, when: \'request.headers["x-missing"] == "1"\'}\n'
    decision = pipeline(tmp_path, access("a", rules)).decide(chat())
    assert not decision.allowed and decision.reason == "policy_error"
    assert decision.errors and "x-missing" in decision.errors[0]


def test_on_error_allow_skips_the_rule(tmp_path: Path) -> None:
    rules = '    - {name: header, effect: deny, when: \'request.headers["x-missing"] == "1"\'}\n' + ALLOW_ALL
    decision = pipeline(tmp_path, access("a", rules, "  on_error: allow\n")).decide(chat())
    assert decision.allowed and decision.errors


def test_a_failing_route_header_follows_on_error(tmp_path: Path) -> None:
    """A header the mesh routes or bills on is part of the decision, as a condition is."""
    routing = (
        "kind: RoutingPolicy\nmetadata: {name: rt}\nspec:\nEXTRA  routes:\n"
        "    - {name: r, candidates: [b1], headers: {x-region: 'request.headers[\"x-region\"]'}}\n"
    )
    telemetry = TelemetrySnapshot({"b1": BackendStats("b1")})
    closed = pipeline(tmp_path, access("a", ALLOW_ALL), routing.replace("EXTRA", "")).decide(
        chat(), telemetry
    )
    assert (closed.allowed, closed.status, closed.reason) == (False, 503, "policy_error")
    assert closed.errors and "x-region" in closed.errors[0]
    lenient = routing.replace("EXTRA", "  on_error: allow\n")
    opened = pipeline(tmp_path, access("a", ALLOW_ALL), lenient).decide(chat(), telemetry)
    assert (opened.allowed, opened.route) == (True, "b1") and opened.errors
    assert "x-region" not in opened.upstream_headers
    given = dataclasses.replace(chat(), headers={"x-region": "eu"})
    routed = pipeline(tmp_path, access("a", ALLOW_ALL), routing.replace("EXTRA", "")).decide(given, telemetry)
    assert routed.allowed and routed.upstream_headers["x-region"] == "eu"
    # null is no error: the header is left out
    nullable = routing.replace("EXTRA", "").replace('request.headers["x-region"]', "request.body.team")
    team = dataclasses.replace(chat(), body=json.dumps({"model": "m", "messages": [], "team": None}).encode())
    left_out = pipeline(tmp_path, access("a", ALLOW_ALL), nullable).decide(team, telemetry)
    assert (left_out.allowed, left_out.errors) == (True, ()) and "x-region" not in left_out.upstream_headers


def test_stage_order_access_before_moderation(tmp_path: Path) -> None:
    moderation = (
        "kind: ModerationPolicy\nmetadata: {name: mod}\nspec:\n  rules:\n    - {name: all, when: 'true'}\n"
    )
    deny = access("a", "    - {name: no, effect: deny, when: 'true', status: 401}\n")
    decision = pipeline(tmp_path, moderation, deny).decide(chat())
    assert decision.status == 401
    assert "mod/all" not in decision.fired_ids()


QUOTA = """kind: QuotaPolicy
metadata: {name: q}
spec:
  limits:
    - name: reqs
      key: tenant.id
      requests: {limit: 5, window: 30s}
    - name: toks
      key: tenant.id
      tokens: {input: 100, output: 50, window: 1h}
"""


class Recording:
    def __init__(self, used: dict[str, int]) -> None:
        self.used = used
        self.asked: list[tuple[str, float]] = []

    def usage(self, counter: CounterId, window: float) -> Usage:
        self.asked.append((str(counter), window))
        return Usage(self.used.get(counter.kind, 0), 12.2)


def test_quota_counters_metadata_and_headers(tmp_path: Path) -> None:
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA)
    view = Recording({"requests": 2, "input_tokens": 10})
    decision = p.decide(chat("x " * 40, max_tokens=30), quota=view)
    assert decision.allowed
    assert view.asked == [
        ("q/reqs/requests/t1", 30.0),
        ("q/toks/input_tokens/t1", 3600.0),
        ("q/toks/output_tokens/t1", 3600.0),
    ]
    assert [q.kind for q in decision.quota] == ["requests", "input_tokens", "output_tokens"]
    assert decision.quota[0].cost == 1 and decision.quota[2].cost == 30 and decision.quota[1].cost > 10
    # What Envoy passes back after the response: per token kind, counters and reservations.
    metadata = decision.dynamic_metadata
    assert json.loads(metadata["pe_output_tokens"]) == [["q/toks/output_tokens/t1", 30]]
    assert json.loads(metadata["pe_input_tokens"]) == [["q/toks/input_tokens/t1", decision.quota[1].cost]]
    assert metadata["pe_tenant"] == "t1" and "pe_total_tokens" not in metadata
    # The tightest budget (requests: 2 of 5 used, this one makes 3) is reported, and per kind
    # in OpenAI's headers: what is left once this request's estimate is reserved (tokens: the
    # output budget, 30 of 50 reserved, is tighter than the input one, 10 used + 40 of 100).
    assert decision.response_headers == {
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "2",
        "x-ratelimit-reset": "13",
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "12.2s",
        "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "12.2s",
    }
    assert [q.remaining for q in decision.quota] == [2, 50, 20]


def test_a_store_refusal_reads_like_a_quota_stage_refusal(tmp_path: Path) -> None:
    """The store refused after the decision: the record must match deciding with that usage."""
    routing = "kind: RoutingPolicy\nmetadata: {name: r}\nspec: {routes: [{name: all, candidates: [b1]}]}\n"
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA, routing)
    telemetry = TelemetrySnapshot({"b1": BackendStats("b1")})
    allowed = p.decide(chat(), telemetry)
    assert allowed.allowed and "r/all" in allowed.fired_ids()
    states = [
        CounterState(check.counter, 5 if check.kind == "requests" else 0, 3.0, False)
        for check in allowed.quota
    ]
    refused = settle(allowed, states, admitted=False)
    direct = p.decide(chat(), telemetry, quota=Recording({"requests": 5}))
    assert (refused.allowed, refused.status, refused.reason) == (False, 429, "rate_limit_exceeded")
    assert [(f.id, f.effect) for f in refused.fired] == [(f.id, f.effect) for f in direct.fired]


def test_a_429_says_when_every_exceeded_budget_has_room(tmp_path: Path) -> None:
    """Two budgets exceeded: the 429's headers describe the one that frees last (its status and
    message stay the first's), so a client retrying when told finds room in both."""
    routing = "kind: RoutingPolicy\nmetadata: {name: r}\nspec: {routes: [{name: all, candidates: [b1]}]}\n"
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA, routing)
    allowed = p.decide(chat(), TelemetrySnapshot({"b1": BackendStats("b1")}))
    waits = {"requests": 30.0, "input_tokens": 1170.0, "output_tokens": 5.0}
    states = [CounterState(check.counter, 10**6, waits[check.kind], True) for check in allowed.quota]
    refused = settle(allowed, states, admitted=False)
    assert (refused.status, refused.reason) == (429, "rate_limit_exceeded")
    assert refused.response_headers["retry-after"] == "1170"
    assert refused.response_headers["x-ratelimit-limit"] == "100"  # the input budget's
    # OpenAI's headers: per kind, the exceeded budget that frees last, and the wait in ms.
    assert {k: v for k, v in refused.response_headers.items() if k.startswith(("x-ratelimit-", "retry"))} == {
        "x-ratelimit-limit": "100",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1170",
        "retry-after": "1170",
        "retry-after-ms": "1170000",
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "19m30s",
    }


def test_openai_headers_on_a_429_of_one_kind_describe_the_other_kind_as_it_stands(tmp_path: Path) -> None:
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA)
    usage = StaticUsage({"q/reqs": {"requests": 3}, "q/toks": {"output_tokens": 50}})
    decision = p.decide(chat(), quota=usage)
    assert (decision.allowed, decision.status) == (False, 429)
    headers = decision.response_headers
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("50", "0")
    # The request budget was not what refused, and a 429 charges nothing: 3 of 5 used, 2 left.
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("5", "2")
    assert headers["retry-after-ms"] == str(int(headers["retry-after"]) * 1000)
    # Waiting an hour: OpenAI's SDKs, which retry on their own backoff past a minute, are told not to.
    assert int(headers["retry-after"]) > 60 and headers["x-should-retry"] == "false"


def test_a_denial_after_the_quota_stage_carries_no_quota_headers(tmp_path: Path) -> None:
    """The quota stage passed, then routing found no backend: the quota headers described an
    admission this 503 undoes (in the service, a view of no usage the store never settled)."""
    routing = "kind: RoutingPolicy\nmetadata: {name: r}\nspec: {routes: [{name: all, candidates: [b1]}]}\n"
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA, routing)
    unavailable = p.decide(chat(), quota=Recording({"requests": 2}))
    assert (unavailable.allowed, unavailable.status) == (False, 503)
    assert unavailable.quota  # the budgets were checked
    assert not [k for k in unavailable.response_headers if k.startswith(("x-ratelimit", "retry-after-ms"))]
    assert unavailable.response_headers["retry-after"].isdigit()  # the routing policy's own


def check(kind: str, limit: int, used: int, cost: int, reset_s: float = 30.0) -> QuotaCheck:
    exceeded, remaining = outcome(kind, limit, used, cost)
    return QuotaCheck(
        f"q/{kind}", "q", "l", kind, "t", limit, 60.0, "fixed", used, cost, remaining, reset_s, exceeded
    )


def test_a_429_describes_the_other_kind_by_what_it_had_before_the_refused_request() -> None:
    """Nothing is spent on a 429: of the token budgets, the output one (30 of 50 used) is the
    tighter, though counting this request's 80-token prompt would have made the input one so."""
    requests = check("requests", 5, 5, 1)
    checks = [requests, check("input_tokens", 100, 10, 80), check("output_tokens", 50, 30, 0)]
    headers = quota_headers(checks, [requests])
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("50", "20")


def test_only_a_wait_of_a_minute_or_more_tells_openais_sdks_not_to_retry() -> None:
    for reset_s, told in ((59.9, False), (59.9999, True), (60.0, True), (3600.0, True), (1.0, False)):
        requests = check("requests", 5, 5, 1, reset_s)
        headers = quota_headers([requests], [requests])
        assert headers.get("x-should-retry") == ("false" if told else None), reset_s
    allowed = check("requests", 5, 0, 1, 3600.0)
    assert "x-should-retry" not in quota_headers([allowed])


def test_openai_reset_durations_are_written_as_openai_writes_them() -> None:
    from policy_engine.decide.quota import duration

    cases = {0.0: "0ms", 0.2504: "251ms", 12.2: "12.2s", 59.9991: "1m0s", 60: "1m0s", 360: "6m0s"}
    cases |= {3723.5: "1h2m3.5s", 86400: "24h0m0s", 1.0: "1s", 0.9999: "1s", -3: "0ms"}
    assert {seconds: duration(seconds) for seconds in cases} == cases


def test_output_token_budget_spent(tmp_path: Path) -> None:
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA)
    decision = p.decide(chat(), quota=StaticUsage({"q/toks": {"output_tokens": 50}}))
    assert (decision.allowed, decision.status) == (False, 429)
    assert decision.response_headers["x-ratelimit-limit"] == "50"
    assert decision.response_headers["retry-after"] == "3600"


def test_missing_telemetry_means_no_route(tmp_path: Path) -> None:
    routing = """kind: RoutingPolicy
metadata: {name: r}
spec:
  routes:
    - {name: only, candidates: [a, b], score: 'backend.latency_p99_ms'}
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), routing)
    assert p.decide(chat()).status == 503
    snapshot = TelemetrySnapshot(
        {"a": BackendStats("a", latency_p99_ms=20), "b": BackendStats("b", latency_p99_ms=10)}
    )
    assert p.decide(chat(), snapshot).route == "b"


def test_canary_assignment_is_sticky_and_follows_weight(tmp_path: Path) -> None:
    canary = """kind: CanaryPolicy
metadata: {name: c}
spec:
  stable: v1
  canary: v2
  weight: 30
  sticky_key: llm.user
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), canary)
    first = {u: p.decide(chat(user=u)).canary["c"] for u in (f"user-{i}" for i in range(400))}
    again = {u: p.decide(chat(user=u)).canary["c"] for u in first}
    assert first == again
    share = sum(v == "canary" for v in first.values()) / len(first)
    assert 0.22 < share < 0.38
    # Raising the weight only moves users from stable to canary, never back.
    raised = {u: p.decide(chat(user=u), canary_weights={"c": 60}).canary["c"] for u in first}
    assert all(raised[u] == "canary" for u, v in first.items() if v == "canary")
    assert p.decide(chat(user="user-1")).upstream_headers["x-pe-canary"] in ("v1", "v2")


def test_requests_without_a_sticky_key_follow_the_weight_one_by_one(tmp_path: Path) -> None:
    canary = (
        "kind: CanaryPolicy\nmetadata: {name: c}\n"
        "spec: {stable: v1, canary: v2, weight: 30, sticky_key: llm.user}\n"
    )
    p = pipeline(tmp_path, access("a", ALLOW_ALL), canary)
    variants = []
    for index in range(400):
        attrs = dataclasses.replace(chat(), id=f"request-{index}")  # no user: the sticky key is ""
        variants.append(p.decide(attrs).canary["c"])
    share = variants.count("canary") / len(variants)
    assert 0.22 < share < 0.38, share


def test_only_eligible_requests_carry_the_canary_header(tmp_path: Path) -> None:
    canary = (
        "kind: CanaryPolicy\nmetadata: {name: c}\n"
        "spec: {stable: v1, canary: v2, weight: 100, eligible: 'llm.user != \"vip\"'}\n"
    )
    p = pipeline(tmp_path, access("a", ALLOW_ALL), canary)
    eligible, vip = p.decide(chat(user="u1")), p.decide(chat(user="vip"))
    assert eligible.canary["c"] == "canary" and eligible.upstream_headers["x-pe-canary"] == "v2"
    assert vip.canary["c"] == "stable" and "x-pe-canary" not in vip.upstream_headers


def test_error_messages_never_repeat_a_credential(tmp_path: Path) -> None:
    """CEL errors quote the value they failed on; a key looked up in a map would be quoted."""
    lookup = '{"sk-known-key-1": true}[request.headers["x-api-key"]]'
    rules = f"    - {{name: partner, effect: allow, when: '{lookup}'}}\n"
    attrs = dataclasses.replace(
        chat(), headers={"x-api-key": "sk-secret-key-0042", "authorization": "Bearer tok-abcdef"}
    )
    decision = pipeline(tmp_path, access("a", rules)).decide(attrs)
    assert decision.errors and "<redacted>" in decision.errors[0]
    assert not any("sk-secret-key-0042" in e or "tok-abcdef" in e for e in decision.errors)


def test_internal_failure_is_a_decision(tmp_path: Path) -> None:
    class Broken:
        def usage(self, counter: CounterId, window: float) -> Usage:
            raise ConnectionError("store down")

    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA)
    decision = p.decide(chat(), quota=Broken())
    assert (decision.allowed, decision.status, decision.reason) == (False, 500, "internal_error")
    assert "store down" in decision.errors[0]


def test_body_reaches_cel_only_when_used(tmp_path: Path) -> None:
    rules = "    - {name: body, effect: allow, when: 'request.body.temperature == 0.5'}\n"
    p = pipeline(tmp_path, access("a", rules))
    assert "body" in p.bundle.references
    assert p.decide(chat(temperature=0.5)).allowed
    assert not p.decide(chat(temperature=0.7)).allowed
    (tmp_path / "other").mkdir()
    assert "body" not in pipeline(tmp_path / "other", access("a", ALLOW_ALL)).bundle.references


def test_quota_key_error_falls_back_and_fails_closed(tmp_path: Path) -> None:
    quota = """kind: QuotaPolicy
metadata: {name: q}
spec:
  limits:
    - {name: by-user, key: 'request.headers["x-user"]', requests: {limit: 5, window: 1m}}
    - {name: by-tenant, key: tenant.id, requests: {limit: 5, window: 1m}}
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), quota)
    decision = p.decide(chat())
    assert (decision.allowed, decision.status, decision.reason) == (False, 500, "policy_error")
    assert any("q/by-user" in e for e in decision.errors)
    with_header = RequestAttributes(path="/v1/chat/completions", headers={"x-user": "u1"})
    allowed = p.decide(with_header)
    assert allowed.allowed and [q.key for q in allowed.quota] == ["u1", ""]


def test_a_failing_score_skips_only_that_backend(tmp_path: Path) -> None:
    routing = """kind: RoutingPolicy
metadata: {name: r}
spec:
  routes:
    - {name: gpu, candidates: [a, b], score: 'double(backend.labels["gpu"])'}
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), routing)
    snapshot = TelemetrySnapshot({"a": BackendStats("a"), "b": BackendStats("b", labels={"gpu": "2"})})
    decision = p.decide(chat(), snapshot)
    assert decision.route == "b"
    assert any("r/gpu" in e and "gpu" in e for e in decision.errors)
    both = TelemetrySnapshot(
        {"a": BackendStats("a", labels={"gpu": "1"}), "b": BackendStats("b", labels={"gpu": "2"})}
    )
    clean = p.decide(chat(), both)
    assert clean.route == "a" and not clean.errors


def test_fallbacks_are_evaluated_only_when_no_candidate_is_eligible(tmp_path: Path) -> None:
    routing = """kind: RoutingPolicy
metadata: {name: r}
spec:
  routes:
    - {name: gpu, candidates: [a], fallback: [b], score: 'double(backend.labels["gpu"])'}
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), routing)
    # b has no "gpu" label: scoring it would be an error, recorded in the decision.
    healthy = TelemetrySnapshot({"a": BackendStats("a", labels={"gpu": "1"}), "b": BackendStats("b")})
    decision = p.decide(chat(), healthy)
    assert decision.route == "a" and not decision.errors
    down = TelemetrySnapshot(
        {"a": BackendStats("a", healthy=False, labels={"gpu": "1"}), "b": BackendStats("b")}
    )
    failed = p.decide(chat(), down)
    assert failed.status == 503 and any("r/gpu" in e for e in failed.errors)


def test_batched_and_one_by_one_agree(example_bundle: object) -> None:
    """The batch programs are an optimisation only: stripping them changes no decision."""
    import dataclasses

    from policy_engine.policy.bundle import Bundle

    assert isinstance(example_bundle, Bundle)

    def strip(policy: object) -> object:
        changes = {f: None for f in ("batch", "shed_batch", "route_batch") if hasattr(policy, f)}
        if hasattr(policy, "routes"):
            changes["routes"] = tuple(
                dataclasses.replace(r, pick=None, pick_fallback=None)
                for r in policy.routes  # type: ignore[attr-defined]
            )
        return dataclasses.replace(policy, **changes)  # type: ignore[type-var]

    plain = dataclasses.replace(
        example_bundle,
        access=tuple(strip(p) for p in example_bundle.access),  # type: ignore[misc]
        moderation=tuple(strip(p) for p in example_bundle.moderation),  # type: ignore[misc]
        routing=tuple(strip(p) for p in example_bundle.routing),  # type: ignore[misc]
        quota=tuple(strip(p) for p in example_bundle.quota),  # type: ignore[misc]
    )
    from policy_engine.policy.testing import run_tests
    from tests.conftest import POLICIES

    fast, slow = run_tests(example_bundle, POLICIES), run_tests(plain, POLICIES)
    assert fast.passed == slow.passed == len(slow.results) >= 40
    for a, b in zip(fast.results, slow.results, strict=True):
        assert a.decision is not None and b.decision is not None
        assert (a.decision.allowed, a.decision.status, a.decision.route, a.decision.fired_ids()) == (
            b.decision.allowed,
            b.decision.status,
            b.decision.route,
            b.decision.fired_ids(),
        ), a.name


def test_explore_sends_a_share_to_other_eligible_backends(tmp_path: Path) -> None:
    routing = """kind: RoutingPolicy
metadata: {name: r}
spec:
  routes:
    - {name: least, candidates: [a, b, c], score: 'backend.latency_p50_ms', explore: 0.2}
"""
    p = pipeline(tmp_path, access("a", ALLOW_ALL), routing)
    snapshot = TelemetrySnapshot(
        {
            "a": BackendStats("a", latency_p50_ms=10),
            "b": BackendStats("b", latency_p50_ms=50),
            "c": BackendStats("c", latency_p50_ms=5, stale=True),
        }
    )

    def route(request_id: str) -> str | None:
        attrs = RequestAttributes(id=request_id, path="/v1/chat/completions", source=chat().source)
        return p.decide(attrs, snapshot).route

    routes = [route(f"req-{i}") for i in range(1000)]
    assert "c" not in routes  # exploring never picks an ineligible backend
    assert 0.15 < routes.count("b") / len(routes) < 0.25
    assert route("req-7") == route("req-7")  # deterministic per request
    assert route("") == "a"  # no request id: no exploring


def test_token_metadata_is_the_json_of_counter_and_reservation_pairs() -> None:
    def check(counter: str, kind: str, cost: int) -> QuotaCheck:
        return QuotaCheck(counter, "p", "l", kind, "k", 10, 60.0, "sliding", 0, cost, 10, 60.0, False)

    checks = [
        check('q/tokens/total_tokens/t\u00fc"\\ \U0001f600', "total_tokens", 5),
        check("q/tokens/total_tokens/k", "total_tokens", 7),
        check("q/requests/requests/k", "requests", 1),
        check("q/in/input_tokens/k", "input_tokens", 3),
    ]
    metadata = token_metadata(checks)
    assert set(metadata) == {"pe_total_tokens", "pe_input_tokens"}
    for key, text in metadata.items():
        expected = [[c.counter, c.cost] for c in checks if f"pe_{c.kind}" == key]
        assert text.isascii()  # it may travel as an HTTP header
        assert json.loads(text) == expected
        assert text == json.dumps(expected, separators=(",", ":"))


def test_token_metadata_reserves_only_what_the_store_holds() -> None:
    # A store that failed part-way kept one counter's estimate: only that one says so.
    def check(counter: str, cost: int) -> QuotaCheck:
        return QuotaCheck(
            counter, "p", "l", "total_tokens", "k", 10, 60.0, "sliding", 0, cost, 10, 60.0, False
        )

    checks = [check("q/a/total_tokens/k", 5), check("q/b/total_tokens/k", 7)]
    kept = token_metadata(checks, reserved_at=12.5, reserved=frozenset({"q/b/total_tokens/k"}))
    assert json.loads(kept["pe_total_tokens"]) == [
        ["q/a/total_tokens/k", 0, 12.5],
        ["q/b/total_tokens/k", 7, 12.5],
    ]
    none = token_metadata(checks, reserved=frozenset())
    assert json.loads(none["pe_total_tokens"]) == [["q/a/total_tokens/k", 0], ["q/b/total_tokens/k", 0]]


def test_messages_reach_a_policy_that_reads_them(tmp_path: Path) -> None:
    # Without a policy that names llm.messages the pipeline skips building them; with one
    # they are all there, in order, multi-part contents joined.
    p = pipeline(
        tmp_path,
        access(
            "a",
            "    - {name: two, effect: allow, when: 'size(llm.messages) == 2 &&"
            ' llm.messages[0].role == "system" && llm.messages[1].content == "a\\nb"\'}\n',
        ),
    )
    request = chat()
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    }
    decision = p.decide(dataclasses.replace(request, body=json.dumps(body).encode()))
    assert decision.allowed, decision.fired
    assert p.decide(request).status == 403  # one message: the rule does not fire


def test_lone_surrogates_in_a_body_become_replacement_characters(tmp_path: Path) -> None:
    # Neither form is Unicode: orjson refuses both, the standard parser lets both through
    # (escaped, or raw UTF-8 bytes it decodes with surrogatepass). A lookup of such a string in
    # a protobuf map would fail, and an `on_error: allow` policy would then let the request by.
    access_policy = """kind: AccessPolicy
metadata: {name: a}
spec:
  on_error: allow
  rules:
    - {name: all, effect: allow, when: 'true'}
    - {name: unknown-model, effect: deny, when: '!(llm.model in telemetry.backends)', status: 404}
"""
    p = pipeline(tmp_path, access_policy)
    snapshot = TelemetrySnapshot({"m": BackendStats("m")})
    for raw in (b'{"model": "\xed\xa0\x80"}', b'{"model": "\\ud800"}', b'{"model": "a\\udc00b"}'):
        request = dataclasses.replace(chat(), body=raw)
        assert "\ufffd" in parse_body(request)["model"], raw
        decision = p.decide(request, snapshot)
        assert (decision.allowed, decision.status, decision.errors) == (False, 404, ()), raw


def test_a_decision_the_store_settles_gets_its_quota_headers_and_metadata_from_the_store_once(
    tmp_path: Path,
) -> None:
    """The service decides against no usage and settles in its store, which writes the quota
    headers and token metadata: the pipeline leaves them out (they were computed twice), and the
    settled decision is the same either way."""
    routing = "kind: RoutingPolicy\nmetadata: {name: r}\nspec: {routes: [{name: all, candidates: [b1]}]}\n"
    p = pipeline(tmp_path, access("a", ALLOW_ALL), QUOTA, routing)
    telemetry = TelemetrySnapshot({"b1": BackendStats("b1")})
    deferred = p.decide(chat(), telemetry, store_settles=True)
    assert deferred.allowed and deferred.quota
    assert not [k for k in deferred.response_headers if k.startswith("x-ratelimit")]
    assert set(deferred.dynamic_metadata) == {"pe_tenant"}
    written = p.decide(chat(), telemetry)
    assert "pe_input_tokens" in written.dynamic_metadata and "x-ratelimit-limit" in written.response_headers
    for used, admitted, at in ((2, True, 123.0), (2, True, None), (10**6, False, None)):
        states = [CounterState(check.counter, used, 9.0, not admitted) for check in written.quota]
        a, b = settle(deferred, states, admitted, at), settle(written, states, admitted, at)
        assert a == b and list(a.response_headers.items()) == list(b.response_headers.items())
        assert a.allowed is admitted
    kept = frozenset({written.quota[0].counter})
    assert store_failed(deferred, "down", kept, 1.0) == store_failed(written, "down", kept, 1.0)
