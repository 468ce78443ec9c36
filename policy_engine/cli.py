"""The `policy-engine` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from policy_engine import __version__
from policy_engine.decide.decision import Decision
from policy_engine.decide.pipeline import Pipeline
from policy_engine.decide.tenants import hash_key
from policy_engine.envoy.options import CHARGING_HELP, USAGE_HELP, Charging, UsageReader, combination_warning
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import BundleError, load_bundle
from policy_engine.policy.schema import json_schema
from policy_engine.policy.source import SourceError, parse_documents
from policy_engine.policy.testing import DecisionInput, TestReport, run_tests, schema_of_test_files

app = typer.Typer(
    help="Policy decision service for LLM traffic: CEL policies for access, moderation, routing, quotas "
    "and canaries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Without markup: what is printed quotes policies, requests and logs, where "[/INST]" is text.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def labelled(label: str, style: str, text: object) -> Text:
    return Text.assemble((label, style), " ", str(text))


PolicyDir = Annotated[Path, typer.Argument(help="Policy directory.", show_default=True)]


def _load(directory: Path) -> Bundle:
    try:
        return load_bundle(directory)
    except BundleError as error:
        for issue in error.issues:
            err.print(labelled("error", "red", issue))
        err.print(f"{len(error.issues)} error(s) in {directory}")
        raise typer.Exit(1) from None


@app.command()
def check(directory: PolicyDir = Path("policies")) -> None:
    """Parse, validate and type-check every policy; exit 1 on any error (all are listed)."""
    bundle = _load(directory)
    out.print(
        f"ok: {len(bundle.files)} file(s), {len(bundle.policies())} policies, "
        f"{len(bundle.rule_ids())} rules, bundle {bundle.version}"
    )
    expressions = bundle.expressions()
    in_engine = [e for e in expressions if not e.program.native]
    out.print(f"{len(expressions) - len(in_engine)} of {len(expressions)} expressions run as Python")
    for expr in in_engine:
        # Still correct, only slower: see docs/authoring.md on what runs in the engine.
        out.print(f"  in the CEL engine: {expr.position}: {expr.source}")


def _print_report(report: TestReport, verbose: bool) -> None:
    for issue in report.issues:
        err.print(labelled("error", "red", issue))
    for result in report.results:
        if result.passed:
            if verbose:
                out.print(labelled("PASS", "green", f"{result.file}: {result.name}"))
            continue
        out.print(labelled("FAIL", "red", f"{result.position}: {result.name}"))
        for failure in result.failures:
            out.print(f"     {failure}")
    table = Table(title="rule coverage", show_lines=False)
    table.add_column("rule")
    table.add_column("fired", justify="right")
    for rule in report.rules:
        count = report.coverage[rule]
        table.add_row(
            Text(rule, style="" if count else "yellow"), Text(str(count), style="" if count else "yellow")
        )
    out.print(table)
    covered = len(report.rules) - len(report.uncovered)
    percent = 100.0 * covered / len(report.rules) if report.rules else 100.0
    out.print(f"coverage: {covered}/{len(report.rules)} rules fired ({percent:.0f}%)")
    if report.uncovered:
        out.print("never fired: " + ", ".join(report.uncovered))
    colour = "green" if report.ok else "red"
    summary = f"{report.passed} passed, {report.failed} failed"
    if report.issues:  # the tests of a file that does not load did not run: not "0 failed"
        summary += f", {len(report.issues)} error(s) in test files (their tests did not run)"
    out.print(Text(summary, style=colour))


@app.command()
def test(
    directory: PolicyDir = Path("policies"),
    run: Annotated[str, typer.Option("--run", help="Only tests whose name contains this.")] = "",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List passing tests too.")] = False,
    require_coverage: Annotated[
        bool, typer.Option("--require-coverage", help="Fail when any rule never fired.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> None:
    """Run the *_test.yaml policy tests of a directory and print per-rule coverage."""
    bundle = _load(directory)
    report = run_tests(bundle, directory, run)
    if json_output:
        data = {
            "passed": report.passed,
            "failed": report.failed,
            "issues": [str(i) for i in report.issues],
            "failures": [
                {"test": r.name, "at": str(r.position), "failures": r.failures}
                for r in report.results
                if not r.passed
            ],
            "coverage": {rule: report.coverage[rule] for rule in report.rules},
            "uncovered": report.uncovered,
        }
        out.print_json(json.dumps(data))
    else:
        _print_report(report, verbose)
    if not report.results and not report.issues:
        if run:
            err.print(f"no test in {directory} has a name containing {run!r}")
        else:
            err.print(f"no tests found in {directory} (files named *_test.yaml)")
    if not report.ok or (require_coverage and report.uncovered):
        raise typer.Exit(1)


def _explain(decision: Decision) -> None:
    verdict = (
        Text("ALLOW", style="green")
        if decision.allowed
        else Text.assemble((f"DENY {decision.status}", "red"), f" {decision.reason}")
    )
    where = f"  route: {decision.route or '-'}  tenant: {decision.tenant or '-'}"
    out.print(Text.assemble("decision: ", verdict, where))
    if decision.message:
        out.print(f"message: {decision.message}")
    table = Table(title="why")
    for column in ("policy", "rule", "effect", "detail"):
        table.add_column(column)
    for fired in decision.fired:
        table.add_row(
            fired.policy, fired.rule, fired.effect + (" (dry run)" if fired.dry_run else ""), fired.detail
        )
    out.print(table)
    for name, value in {**decision.upstream_headers}.items():
        out.print(f"upstream header {name}: {value}")
    for name, value in decision.response_headers.items():
        out.print(f"response header {name}: {value}")
    for finding in decision.dry_run:
        out.print(f"dry run: {finding.id} would {finding.effect} ({finding.detail})")
    for error in decision.errors:
        out.print(labelled("error", "yellow", error))


@app.command("eval")
def evaluate(
    directory: PolicyDir = Path("policies"),
    input_file: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help="JSON or YAML file: request, source, telemetry, quota, tenant, time."
        ),
    ] = Path("-"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
) -> None:
    """Decide one request and show which rules fired and why."""

    bundle = _load(directory)
    try:
        if str(input_file) == "-":
            if sys.stdin.isatty():
                err.print("reading the input from standard input (end with Ctrl-D; -i FILE reads a file)")
            text = sys.stdin.read()
        else:
            text = input_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        err.print(f"cannot read the input {input_file}: {error}")
        raise typer.Exit(2) from None
    shown = "<stdin>" if str(input_file) == "-" else str(input_file)
    try:
        documents = list(parse_documents(shown, text))
    except SourceError as error:
        for issue in error.issues:
            err.print(f"invalid input {issue}")
        raise typer.Exit(2) from None
    if len(documents) > 1:
        err.print(f"invalid input {documents[1].position(())}: one request per input, not several documents")
        raise typer.Exit(2)
    document = documents[0] if documents else None
    try:
        decision_input = DecisionInput.model_validate(document.data if document is not None else {})
    except ValidationError as error:
        for problem in error.errors(include_url=False):
            loc = tuple(problem["loc"])
            where = "" if document is None else f"{document.problem_position(loc, problem['type'])}: "
            err.print(f"invalid input {where}{'.'.join(map(str, loc))}: {problem['msg']}")
        raise typer.Exit(2) from None
    decision = decision_input.decide(Pipeline(bundle))
    if json_output:
        out.print_json(json.dumps(decision.to_dict(), default=str))
    else:
        _explain(decision)
    if decision.reason == "no_backend_available" and not decision_input.telemetry.backends:
        err.print(
            "note: the input gives no telemetry, so every backend counts as stale; describe the "
            "backends under telemetry.backends (docs/authoring.md, the input of a test)"
        )


@app.command()
def audit(
    log: Annotated[Path, typer.Argument(help="Decision log file (JSON lines).")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant id.")] = None,
    rule: Annotated[
        str | None, typer.Option(help="Only decisions where this POLICY/RULE (or any rule of POLICY) fired.")
    ] = None,
    decision: Annotated[str | None, typer.Option(help="Only allow or deny.")] = None,
    since: Annotated[str | None, typer.Option(help="From this time: ISO 8601 or ago (-10m, 2h, 1d).")] = None,
    until: Annotated[str | None, typer.Option(help="Up to this time: ISO 8601 or ago.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Show at most the last N matches; 0 = all.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Matching records as JSON lines.")] = False,
) -> None:
    """Search a decision log by tenant, fired rule, decision and time range."""
    from policy_engine.audit import log_query as q

    if decision not in (None, "allow", "deny"):
        err.print(f"--decision must be allow or deny, not {decision!r}")
        raise typer.Exit(2)
    try:
        query = q.Query(
            tenant=tenant,
            rule=rule,
            decision=decision,
            since=q.parse_time(since) if since else None,
            until=q.parse_time(until) if until else None,
        )
        skipped: list[q.Skipped] = []
        matches = [r for r in q.read_records(q.open_log(log), skipped) if query.matches(r)]
    except q.LogQueryError as error:
        err.print(str(error))
        raise typer.Exit(2) from None
    if limit:
        matches = matches[-limit:]
    if json_output:
        for record in matches:
            sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    else:
        table = Table(title=f"{len(matches)} decision(s) in {log}")
        for column in ("time", "request id", "tenant", "decision", "reason", "route", "fired", "ms"):
            table.add_column(column, overflow="fold")
        for record in matches:
            denied = record.get("decision") == "deny"
            table.add_row(
                str(record.get("time", ""))[:23],
                str(record.get("request_id", "")),
                str(record.get("tenant") or "-"),
                Text(f"deny {record.get('status')}", style="red") if denied else Text("allow", style="green"),
                str(record.get("reason") or ""),
                str(record.get("route") or "-"),
                ", ".join(str(f.get("rule")) for f in record.get("fired", []) if isinstance(f, dict)),
                str(record.get("latency_ms", "")),
            )
        out.print(table)
    if skipped:
        err.print(f"skipped {len(skipped)} line(s) that are not decision records (first: {skipped[0].line})")


@app.command()
def explain(
    log: Annotated[Path, typer.Argument(help="Decision log file (JSON lines).")],
    request_id: Annotated[str, typer.Argument(help="The request id (x-request-id) to explain.")],
    policies: Annotated[
        Path, typer.Option("--policies", "-p", help="Policy directory to replay with.")
    ] = Path("policies"),
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable explanation.")] = False,
) -> None:
    """Replay a logged decision: which rules fired, and the value of each part of their conditions."""
    from policy_engine.audit.explain import Part, display
    from policy_engine.audit.explain import explain as explain_record
    from policy_engine.audit.log_query import LogQueryError, find_request

    try:
        record = find_request(log, request_id)
    except LogQueryError as error:
        err.print(str(error))
        raise typer.Exit(2) from None
    if record is None:
        err.print(f"request {request_id!r} is not in {log}")
        raise typer.Exit(1)
    explanation = explain_record(record, _load(policies))
    if json_output:
        out.print_json(json.dumps(explanation.to_dict(), default=str))
        return
    for warning in explanation.warnings:
        err.print(f"warning: {warning}")
    logged = f"deny {record.get('status')}" if record.get("decision") == "deny" else "allow"
    out.print(
        f"request {request_id} at {record.get('time')}: {logged} {record.get('reason') or ''}  "
        f"tenant: {record.get('tenant') or '-'}  route: {record.get('route') or '-'}  "
        f"bundle: {record.get('bundle')}"
    )

    def show(part: Part, depth: int) -> None:
        value = f"error: {part.error}" if part.error else display(part.value)
        out.print(f"{'    ' * depth}{part.text}  =>  {value}")
        for child in part.children:
            show(child, depth + 1)

    for fired in explanation.fired:
        out.print(f"\n{fired.rule} ({fired.effect})")
        if not fired.conditions:
            out.print("    (no condition: the policy's default)")
        for role, part in fired.conditions:
            out.print(f"  {role}:")
            show(part, 1)


@app.command()
def schema(
    tests: Annotated[bool, typer.Option("--tests", help="Schema of *_test.yaml files instead.")] = False,
) -> None:
    """Print the JSON Schema of policy documents (for editors: yaml-language-server)."""
    data = schema_of_test_files() if tests else json_schema()
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def reference() -> None:
    """Print the policy language reference (Markdown), generated from the schema."""
    from policy_engine.policy.reference import reference_markdown

    sys.stdout.write(reference_markdown())


@app.command("hash-key")
def hash_key_command(
    key_id: Annotated[str, typer.Option("--id", help="Non-secret id for the key.")] = "key",
) -> None:
    """Read an API key on stdin; print the TenantSet entry that stores it as a salted hash."""
    import yaml

    key = sys.stdin.readline().strip()
    try:
        stored = hash_key(key, key_id)
    except ValidationError:
        err.print(
            f"--id must be a name (lower-case letters, digits, '-', '_', '.'; at most 63), not {key_id!r}"
        )
        raise typer.Exit(2) from None
    except ValueError as error:
        err.print(str(error))
        raise typer.Exit(2) from None
    # Through the YAML writer: a prefix with a space or a quote stays what it is when read back.
    entry = {"id": stored.id, "prefix": stored.prefix, "hash": stored.hash}
    sys.stdout.write(yaml.safe_dump([entry], sort_keys=False))


@app.command()
def serve(
    policies: Annotated[
        Path | None, typer.Option("--policies", "-p", help="Policy directory (env PE_POLICIES).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="gRPC listen address (env PE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port, 0 = any free port (env PE_PORT).")] = None,
    http_port: Annotated[
        int | None,
        typer.Option(help="Also serve Envoy's HTTP ext_authz protocol on this port (env PE_HTTP_PORT)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port, 0 = off (env PE_METRICS_PORT).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Processes sharing the port (env PE_WORKERS).")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Shared counters in Redis (env PE_REDIS_URL).")
    ] = None,
    redis_cluster: Annotated[
        bool | None,
        typer.Option(
            "--redis-cluster",
            help="--redis-url names a node of a Redis Cluster (env PE_REDIS_CLUSTER).",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="NAME=METRICS_URL (scraped) or NAME (passive, never stale); repeat (env PE_BACKENDS).",
        ),
    ] = None,
    backends_file: Annotated[
        Path | None,
        typer.Option(help="YAML backends with metrics URL, capacity, region, ... (env PE_BACKENDS_FILE)."),
    ] = None,
    no_reload: Annotated[
        bool, typer.Option("--no-reload", help="Do not watch the policy directory (env PE_RELOAD=false).")
    ] = False,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound gRPC port to this file (env PE_PORT_FILE).")
    ] = None,
    canary_state: Annotated[
        Path | None,
        typer.Option(help="Rollout state file if no --redis-url (env PE_CANARY_STATE).", show_default=False),
    ] = None,
    no_canary_controller: Annotated[
        bool,
        typer.Option(
            "--no-canary-controller",
            help="Only follow stored weights (`canary run` drives them; env PE_CANARY_CONTROLLER=false).",
        ),
    ] = False,
    decision_log: Annotated[
        str | None,
        typer.Option(help="Decision log: JSON lines to this file, - for stdout (env PE_DECISION_LOG)."),
    ] = None,
    decision_log_sample: Annotated[
        float | None,
        typer.Option(
            help="Fraction 0..1 of allowed decisions logged; denials always are (env PE_DECISION_LOG_SAMPLE)."
        ),
    ] = None,
    decision_log_only: Annotated[
        str | None, typer.Option(help="Log only: all | deny | allow (env PE_DECISION_LOG_ONLY).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: TLS on the gRPC port (env PE_TLS_CERT).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert (env PE_TLS_KEY).")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA: require verified client certificates (env PE_TLS_CLIENT_CA)."),
    ] = None,
) -> None:
    """Run the decision service: ext_authz Check and the rate-limit service on one gRPC port.

    Every setting is also an environment variable PE_<NAME>, some only that (PE_GRACE_S,
    PE_MAX_BODY_BYTES, PE_REDIS_TIMEOUT_S, ...): the table with defaults is in docs/operations.md.
    Decision spans: set OTEL_TRACES_EXPORTER=otlp (or console) and OTEL_EXPORTER_OTLP_ENDPOINT.
    """
    from pydantic import ValidationError

    from policy_engine.config import Settings
    from policy_engine.policy.compiler import BundleError
    from policy_engine.server import WorkersFailing, run

    given = {
        "policies": policies,
        "host": host,
        "port": port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "workers": workers,
        "redis_url": redis_url,
        "redis_cluster": redis_cluster,
        "backends": backend,
        "backends_file": backends_file,
        "port_file": port_file,
        "canary_state": canary_state,
        "decision_log": decision_log,
        "decision_log_sample": decision_log_sample,
        "decision_log_only": decision_log_only,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_client_ca": tls_client_ca,
    }
    overrides: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    if no_reload:
        overrides["reload"] = False
    if no_canary_controller:
        overrides["canary_controller"] = False
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        # Without the input: it would show the Redis URL, password and all.
        flags = {**dict.fromkeys(given), "backends": "backend", "reload": "no-reload"}
        flags["canary_controller"] = "no-canary-controller"
        for problem in error.errors(include_url=False, include_input=False):
            field = str(problem["loc"][0]) if problem["loc"] else ""
            # As the user wrote it: the flag and the variable, not pydantic's field name.
            named = (flags[field] or field).replace("_", "-") if field in flags else ""
            where = f"--{named} / PE_{field.upper()}" if named else (f"PE_{field.upper()}" if field else "")
            err.print(f"invalid settings: {where + ': ' if where else ''}{problem['msg']}")
        raise typer.Exit(2) from None
    try:
        import os

        from policy_engine.audit.tracing import check_environment

        check_environment(os.environ)
    except ValueError as error:
        err.print(f"invalid tracing settings: {error}")
        raise typer.Exit(2) from None
    from policy_engine.config import unknown_settings

    for name, near in unknown_settings(os.environ):
        hint = f" (did you mean {near}?)" if near else ""
        err.print(f"warning: no setting reads {name}; it is ignored{hint}")
    try:
        from policy_engine.server import backend_specs

        backend_specs(settings.backends, settings.backends_file)
    except (OSError, ValueError) as error:  # pydantic's ValidationError and YAML errors are ValueErrors
        err.print(f"invalid backends: {error}")
        raise typer.Exit(2) from None
    try:
        run(settings)
    except BundleError as error:
        for issue in error.issues:
            err.print(labelled("error", "red", issue))
        raise typer.Exit(1) from None
    except (OSError, WorkersFailing) as error:
        err.print(f"cannot start: {error}")
        raise typer.Exit(1) from None


@app.command("envoy-config")
def envoy_config(
    listen_port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the gateway listener.")] = 10000,
    listen_address: Annotated[str, typer.Option(help="Address of the gateway listener.")] = "0.0.0.0",
    admin_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Envoy admin port (bound to 127.0.0.1; 0: any free one).")
    ] = 9901,
    policy: Annotated[str, typer.Option(help="host:port of policy-engine's gRPC port.")] = "127.0.0.1:9001",
    backend: Annotated[
        list[str] | None, typer.Option("--backend", help="NAME=HOST:PORT of a model backend (repeat).")
    ] = None,
    authz_timeout: Annotated[
        float, typer.Option(min=0.001, max=3600, help="Seconds Envoy waits for a decision.")
    ] = 1.0,
    fail_open: Annotated[bool, typer.Option(help="Let requests through when the service is down.")] = False,
    otlp_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of an OTLP/gRPC collector: Envoy traces every request.")
    ] = None,
    policy_http: Annotated[
        str | None,
        typer.Option(
            help="host:port of the service's --http-port: ext_authz over Envoy's HTTP protocol "
            "(lighter than gRPC; the rate-limit service and access log stay on --policy)."
        ),
    ] = None,
    usage_extraction: Annotated[
        UsageReader,
        typer.Option(help=USAGE_HELP),
    ] = UsageReader.lua,
    charging: Annotated[
        Charging,
        typer.Option(help=CHARGING_HELP),
    ] = Charging.access_log,
) -> None:
    """Print an Envoy bootstrap: ext_authz with the body, token charging, routes on x-pe-route."""
    import yaml

    from policy_engine.envoy.bootstrap import GatewayConfig, Upstream, bootstrap

    def upstream(text: str, what: str) -> Upstream:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            err.print(f"{what} must be HOST:PORT with a port from 1 to 65535, not {text!r}")
            raise typer.Exit(2)
        return Upstream(host, int(port))

    backends = {}
    for item in backend or []:
        name, sep, address = item.partition("=")
        if not sep or not name:
            err.print(f"--backend must be NAME=HOST:PORT, not {item!r}")
            raise typer.Exit(2)
        if name in backends:
            err.print(f"--backend {name} is given twice; a backend has one address")
            raise typer.Exit(2)
        backends[name] = upstream(address, "--backend")
    if not backends:
        err.print("warning: no --backend: the gateway routes no request to a model")
    config = GatewayConfig(
        listen_port=listen_port,
        listen_address=listen_address,
        admin_port=admin_port,
        policy=upstream(policy, "--policy"),
        backends=backends,
        authz_timeout_s=authz_timeout,
        failure_mode_allow=fail_open,
        otlp_endpoint=upstream(otlp_endpoint, "--otlp-endpoint") if otlp_endpoint else None,
        authz_transport="http" if policy_http else "grpc",
        policy_http=upstream(policy_http, "--policy-http") if policy_http else None,
        usage_extraction=usage_extraction.config,
        charging=charging.config,
    )
    if (warning := combination_warning(config)) is not None:
        err.print(f"warning: {warning}")
    sys.stdout.write(yaml.safe_dump(bootstrap(config), sort_keys=False))


@app.command()
def demo(
    duration: Annotated[float, typer.Option(min=1, help="Seconds of traffic before the summary.")] = 60.0,
    policies: Annotated[
        Path | None,
        typer.Option(
            "--policies", "-p", help="Policy directory (hot-reloaded). Default: the demo's copy of policies/."
        ),
    ] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Gateway port; 0 = any free port.")] = 8080,
    rate: Annotated[float, typer.Option(min=0.5, max=200, help="Steady requests per second.")] = 10.0,
    dashboard: Annotated[
        bool | None,
        typer.Option("--dashboard/--no-dashboard", help="Live screen; default: only on a terminal."),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where logs, configs and the decision log go (default: a temp dir).")
    ] = None,
    json_summary: Annotated[Path | None, typer.Option(help="Also write the summary as JSON here.")] = None,
) -> None:
    """Run the whole gateway locally: simulated backends, the service and Envoy, with mixed traffic."""
    from policy_engine.demo.processes import DemoError
    from policy_engine.demo.runner import Demo, DemoOptions

    options = DemoOptions(
        duration=duration,
        policies=policies,
        port=port,
        rate=rate,
        dashboard=out.is_terminal if dashboard is None else dashboard,
        workdir=workdir,
        json_summary=json_summary,
    )
    try:
        code = Demo(options, out).run()
    except DemoError as error:
        err.print(f"demo: {error}")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def _add_mesh_commands() -> None:
    from policy_engine.mesh.cli import mesh_app

    app.add_typer(mesh_app, name="mesh-config")


_add_mesh_commands()


def _add_canary_commands() -> None:
    from policy_engine.canary.cli import canary_app

    app.add_typer(canary_app, name="canary")


_add_canary_commands()


def main() -> None:
    app()
