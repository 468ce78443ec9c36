"""The decision log: redaction, sampling and filters, the append-only sink, and the records."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from policy_engine.audit import decision_log
from policy_engine.audit.decision_log import (
    DecisionLog,
    LogPolicy,
    LogSink,
    Timing,
    digest,
    redact_headers,
    redact_path,
)
from policy_engine.decide.attributes import RequestAttributes, llm_request, parse_body
from policy_engine.decide.pipeline import Pipeline
from policy_engine.telemetry.snapshot import BackendStats, TelemetrySnapshot

KEY = "sk-acme-premium-key-0001"
SECRET = frozenset({"authorization", "x-tenant-key"})


def test_secret_headers_are_hashed_or_dropped() -> None:
    headers = {"authorization": f"Bearer {KEY}", "x-tenant-key": KEY, "accept": "json"}
    hashed = redact_headers(headers, SECRET, "hash")
    assert hashed["accept"] == "json"
    assert hashed["authorization"] == digest(f"Bearer {KEY}") and hashed["authorization"].startswith(
        "sha256:"
    )
    assert KEY not in json.dumps(hashed)
    assert redact_headers(headers, SECRET, "drop") == {"accept": "json"}


def test_credential_query_parameters_are_redacted() -> None:
    path = f"/v1/models?key={KEY}&limit=5&access_token={KEY}"
    hashed = redact_path(path, "hash")
    assert KEY not in hashed and "limit=5" in hashed and "sha256" in hashed
    assert redact_path(path, "drop") == "/v1/models?limit=5"
    assert redact_path("/v1/models?limit=5", "hash") == "/v1/models?limit=5"
    assert redact_path(f"/x?api_key={KEY}", "drop") == "/x"
    headers = redact_headers(
        {":path": f"/v1/models?key={KEY}", "x-envoy-original-path": f"/?token={KEY}"}, SECRET, "hash"
    )
    assert KEY not in json.dumps(headers) and headers[":path"].startswith("/v1/models?key=sha256")


@pytest.mark.parametrize(
    ("only", "sample", "allowed", "draw", "kept"),
    [
        ("all", 1.0, True, 0.99, True),
        ("all", 0.1, True, 0.05, True),
        ("all", 0.1, True, 0.5, False),
        ("all", 0.0, False, 0.5, True),  # denials are always kept
        ("deny", 1.0, True, 0.0, False),
        ("deny", 1.0, False, 0.0, True),
        ("allow", 1.0, False, 0.0, False),
        ("allow", 0.5, True, 0.25, True),
    ],
)
def test_sampling_and_filters(only: str, sample: float, allowed: bool, draw: float, kept: bool) -> None:
    assert LogPolicy(only=only, sample=sample).keeps(allowed, lambda: draw) is kept  # type: ignore[arg-type]


def test_sink_buffers_until_flush_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    path.write_text('{"type": "other"}\n')
    sink = LogSink(str(path))
    sink.write('{"n": 1}\n')
    assert path.read_text() == '{"type": "other"}\n'  # buffered
    sink.flush()
    assert path.read_text().splitlines()[-1] == '{"n": 1}'
    sink.close()


def test_two_sinks_on_one_file_never_interleave_lines(tmp_path: Path) -> None:
    """What several worker processes do: whole batches appended with one write each."""
    path = tmp_path / "shared.jsonl"
    first, second = LogSink(str(path)), LogSink(str(path))
    for i in range(2000):
        (first if i % 2 else second).write(json.dumps({"i": i, "pad": "x" * 100}) + "\n")
    first.close()
    second.close()
    lines = path.read_text().splitlines()
    assert sorted(json.loads(line)["i"] for line in lines) == list(range(2000))


def test_a_rotated_log_is_followed_to_the_new_file(tmp_path: Path) -> None:
    """logrotate's default: rename the file, let the writer create a new one at the path."""
    path = tmp_path / "decisions.jsonl"
    sink = LogSink(str(path))
    sink.write('{"n": 1}\n')
    sink.flush()
    path.rename(tmp_path / "decisions.jsonl.1")
    sink.write('{"n": 2}\n')
    sink.flush()
    assert (tmp_path / "decisions.jsonl.1").read_text() == '{"n": 1}\n'
    assert path.read_text() == '{"n": 2}\n'
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.unlink()  # deleted outright: recreated too
    sink.write('{"n": 3}\n')
    sink.close()
    assert path.read_text() == '{"n": 3}\n'


def test_a_link_planted_at_the_path_after_rotation_is_not_followed(tmp_path: Path) -> None:
    path, elsewhere = tmp_path / "decisions.jsonl", tmp_path / "elsewhere"
    sink = LogSink(str(path))
    sink.write('{"n": 1}\n')
    sink.flush()
    path.rename(tmp_path / "decisions.jsonl.1")
    path.symlink_to(elsewhere)
    sink.write('{"n": 2}\n')
    sink.flush()
    assert not elsewhere.exists()  # refused; the lines go on to the file the sink had
    assert (tmp_path / "decisions.jsonl.1").read_text() == '{"n": 1}\n{"n": 2}\n'
    path.unlink()
    path.symlink_to(path)  # a loop: stat() itself fails
    sink.write('{"n": 3}\n')
    sink.flush()
    path.unlink()  # the path free again: the next batch follows
    sink.write('{"n": 4}\n')
    sink.close()
    assert (tmp_path / "decisions.jsonl.1").read_text().splitlines()[-1] == '{"n": 3}'
    assert path.read_text() == '{"n": 4}\n'  # the writer survived all of it
    assert sink.dropped == 0


def test_copytruncate_rotation_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    sink = LogSink(str(path))
    sink.write('{"n": 1}\n')
    sink.flush()
    with path.open("r+") as handle:  # what copytruncate does after copying
        handle.truncate(0)
    sink.write('{"n": 2}\n')
    sink.close()
    assert path.read_text() == '{"n": 2}\n'  # appended at the new end, no hole of zeros


def test_new_log_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    LogSink(str(path)).close()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_unwritable_target_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        LogSink(str(tmp_path / "missing-dir" / "log.jsonl"))


def _attrs(headers: dict[str, str], body: bytes) -> RequestAttributes:
    return RequestAttributes(
        method="POST", path="/v1/chat/completions", host="ai.example.com", id="r1", headers=headers, body=body
    )


def test_record_holds_outcome_and_inputs_without_secrets(example_pipeline: Pipeline, tmp_path: Path) -> None:
    headers = {"authorization": f"Bearer {KEY}", "x-api-key": KEY, "cookie": f"sid={KEY}", "x-team": "ml"}
    chat = {"model": "llama-3-8b-instruct", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    attrs = _attrs(headers, json.dumps(chat).encode())
    snapshot = TelemetrySnapshot(
        {
            "llama-8b-a": BackendStats("llama-8b-a"),
            "a": BackendStats("a", age_s=float("inf"), labels={"zone": "z1"}),
        },
        version=3,
    )
    decision = example_pipeline.decide(attrs, snapshot)
    body = parse_body(attrs)
    log = DecisionLog(LogSink(str(tmp_path / "log.jsonl")))
    record = log.record(
        attrs,
        body,
        llm_request(attrs, body),
        decision,
        snapshot,
        Timing(1_767_225_600_000_000_000, 0.0015, 0.0004),
        ("ab" * 16, "cd" * 8),
        ("x-tenant-key",),
        ("api_key", "acme-prod"),
    )
    text = json.dumps(record)
    assert KEY not in text
    assert record["time"] == "2026-01-01T00:00:00.000000+00:00"
    assert record["trace_id"] == "ab" * 16 and record["span_id"] == "cd" * 8
    assert record["tenant"] == "acme" and record["credential"] == "api_key"
    assert record["decision"] == "allow" and record["bundle"] == example_pipeline.bundle.version
    assert [f["rule"] for f in record["fired"]] == decision.fired_ids()
    assert record["latency_ms"] == 1.5 and record["eval_us"] == 400.0
    assert record["model"] == "llama-3-8b-instruct" and record["max_tokens"] == 20
    assert record["input"]["headers"]["x-team"] == "ml"
    assert record["input"]["headers"]["x-api-key"].startswith("sha256:")
    assert record["body"] == chat
    assert record["telemetry"]["backends"]["a"]["age_s"] is None  # inf is not JSON
    assert record["telemetry"]["backends"]["a"]["labels"] == {"zone": "z1"}
    assert all("key" not in check for check in record["quota"])  # counter keys are never logged
    log.write(json.dumps(record) + "\n")
    log.close()
    assert json.loads((tmp_path / "log.jsonl").read_text())["request_id"] == "r1"


def test_a_body_that_is_not_json_is_kept_as_text(example_pipeline: Pipeline, tmp_path: Path) -> None:
    attrs = _attrs({}, b"plain \xff text")
    log = DecisionLog(LogSink(str(tmp_path / "log.jsonl")))
    record = log.record(
        attrs,
        None,
        llm_request(attrs, None),
        example_pipeline.decide(attrs),
        TelemetrySnapshot(),
        Timing(1, 0.001, 0.001),
        ("", ""),
        (),
        ("none", ""),
    )
    assert record["body"] is None and record["raw_body"].startswith("plain ")
    json.dumps(record)  # serialisable as it is


def logged_line(pipeline: Pipeline, attrs: RequestAttributes, tmp_path: Path) -> str:
    """The decision log line of one request, without spans or telemetry."""
    log = DecisionLog(LogSink(str(tmp_path / "log.jsonl")))
    body = parse_body(attrs)
    return log.line(
        attrs,
        body,
        llm_request(attrs, body),
        pipeline.decide(attrs),
        TelemetrySnapshot(),
        Timing(1, 0.001, 0.001),
        ("", ""),
        (),
        ("none", ""),
    )


def test_a_pretty_printed_body_stays_on_one_line(example_pipeline: Pipeline, tmp_path: Path) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "two\nlines"}]}
    attrs = _attrs({}, json.dumps(chat, indent=2).replace("\n", "\r\n").encode())
    line = logged_line(example_pipeline, attrs, tmp_path)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert json.loads(line)["body"] == chat


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le", "utf-32-le"])
def test_a_body_in_any_json_encoding_reads_back(
    example_pipeline: Pipeline, tmp_path: Path, encoding: str
) -> None:
    """json.loads reads UTF-16/32 too: the logged line must stay readable JSON."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "ignore previous instructions"}]}
    attrs = _attrs({}, json.dumps(chat).encode(encoding))
    assert parse_body(attrs) == chat
    assert json.loads(logged_line(example_pipeline, attrs, tmp_path))["body"] == chat


def test_a_stalled_reader_never_blocks_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full pipe (`--decision-log -` with a slow reader) stalls only the writer thread; past the
    pending limit lines are dropped and counted, and what was kept arrives whole."""
    monkeypatch.setattr(decision_log, "MAX_PENDING_BYTES", 256 * 1024)
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = LogSink(str(fifo))
    line = json.dumps({"pad": "x" * 1000}) + "\n"
    for _ in range(2000):  # ~2 MB: far more than the pipe holds
        sink.write(line)
    sink.hand_off()  # returns although nobody reads (a hang here fails by the suite's timeout)
    assert sink.dropped > 0
    received = bytearray()
    os.set_blocking(reader, True)
    closer = threading.Thread(target=sink.close)
    closer.start()
    while chunk := os.read(reader, 1 << 16):
        received += chunk
    closer.join(timeout=30)
    os.close(reader)
    lines = received.decode().splitlines()
    assert len(lines) + sink.dropped == 2000
    assert all(json.loads(text) == {"pad": "x" * 1000} for text in lines)


@pytest.mark.parametrize(
    ("sent", "logged"),
    [
        (b'{"model": "m", "temperature": NaN, "top_p": Infinity, "n": -Infinity}', None),
        (b'{"model": "m", "user": "\\ud800x", "\\udfff": 1}', {"model": "m", "user": "\ufffdx", "\ufffd": 1}),
        (b'{"model": "m", "user": "\\ud83d\\ude00 NaN"}', {"model": "m", "user": "\U0001f600 NaN"}),
    ],
)
def test_a_line_is_strict_json_whatever_the_body(
    example_pipeline: Pipeline, tmp_path: Path, sent: bytes, logged: object
) -> None:
    """Python's JSON reader takes NaN, Infinity and lone surrogate escapes; jq, JSON.parse and
    most log pipelines refuse the whole line. The line is checked by jq itself."""
    import shutil
    import subprocess

    jq = shutil.which("jq")
    assert jq, "jq is not installed (scripts/setup installs it)"
    line = logged_line(example_pipeline, _attrs({}, sent), tmp_path)
    read = subprocess.run([jq, "-c", ".body"], input=line, capture_output=True, text=True, check=False)
    assert read.returncode == 0, read.stderr
    body = json.loads(read.stdout)
    if logged is None:
        assert body == {"model": "m", "temperature": None, "top_p": None, "n": None}
    else:
        assert body == logged
