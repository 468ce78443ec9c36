"""The decision log: one JSON line per decision, for audits and for `policy-engine explain`.

Each line holds the outcome (tenant, decision, fired rules, route, bundle, latency, trace ids)
and the inputs `explain` replays: the request with its secrets removed, the parsed body, the
quota usage seen and the telemetry snapshot. Secrets never reach the log: the credential
headers (authorization, proxy-authorization, x-api-key, cookies and every TenantSet
`key_headers` entry) are replaced by a short `sha256:` digest or dropped, and so are
credential-like query parameters. Quota counter keys are not logged (an author may key a
counter on anything, even a credential); the counter's policy, limit and kind are.

Lines are buffered and written with one `write()` per batch to a file opened in append mode,
so several worker processes can share one file without interleaving lines; the buffer is
flushed every second and when the service drains. The service does not rotate the file, but
follows a rotation: when the path no longer names the file it writes (logrotate renamed or
deleted it), the next batch goes to a new file at the path, so logrotate's default
rename-and-create works as well as copytruncate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from stat import S_ISREG
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from policy_engine.decide.attributes import LlmRequest, Peer, RequestAttributes
from policy_engine.decide.decision import Decision
from policy_engine.decide.secrets import CREDENTIAL_HEADERS, CREDENTIAL_QUERY
from policy_engine.telemetry.snapshot import TelemetrySnapshot

log = logging.getLogger("policy_engine.audit")

RECORD_TYPE = "decision"
PATH_HEADERS = frozenset({":path", "x-envoy-original-path"})  # carry the query string too
MAX_RAW_BODY = 65_536
_BUFFER_BYTES = 65_536
MAX_PENDING_BYTES = 16 * 1024 * 1024

Only = Literal["all", "deny", "allow"]
SecretMode = Literal["hash", "drop"]


def digest(value: str) -> str:
    """A short, stable stand-in for a secret: equal secrets give equal digests, nothing more."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def redact_headers(headers: Mapping[str, str], secret: frozenset[str], mode: SecretMode) -> dict[str, str]:
    redacted: dict[str, str] = {}
    for name, value in headers.items():
        if name in secret:
            if mode == "hash":
                redacted[name] = digest(value)
        elif name in PATH_HEADERS:
            redacted[name] = redact_path(value, mode)
        else:
            redacted[name] = value
    return redacted


def redact_path(path: str, mode: SecretMode) -> str:
    if "?" not in path:
        return path
    base, query = path.split("?", 1)
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(name.lower() in CREDENTIAL_QUERY for name, _ in pairs):
        return path
    kept = [
        (name, digest(value) if mode == "hash" else "") if name.lower() in CREDENTIAL_QUERY else (name, value)
        for name, value in pairs
        if mode == "hash" or name.lower() not in CREDENTIAL_QUERY
    ]
    return f"{base}?{urlencode(kept)}" if kept else base


def _peer(peer: Peer) -> dict[str, Any]:
    return {"principal": peer.principal, "address": peer.address, "labels": dict(peer.labels)}


@dataclass(frozen=True)
class Timing:
    start_ns: int  # wall clock, when the Check call arrived
    latency_s: float  # the whole Check: pipeline, counter store, response
    eval_s: float  # the pipeline alone

    @property
    def end_ns(self) -> int:
        return self.start_ns + int(self.latency_s * 1e9)


@dataclass(frozen=True)
class LogPolicy:
    """Which decisions are written: `only` filters by result; `sample` thins the allowed ones
    (denials are always kept when the filter lets them through)."""

    only: Only = "all"
    sample: float = 1.0

    def keeps(self, allowed: bool, draw: Callable[[], float]) -> bool:
        if (self.only == "deny" and allowed) or (self.only == "allow" and not allowed):
            return False
        if not allowed or self.sample >= 1.0:
            return True
        return draw() < self.sample


class LogSink:
    """Append-only JSON lines to a file, or to standard output for `-`.

    Lines are collected in memory and written in whole batches (one `write` each, so workers
    sharing a file never interleave lines) by a thread of their own: a slow disk or a full pipe
    must never stall the event loop that answers Envoy. When the writer falls behind by more than
    `MAX_PENDING_BYTES`, new batches are dropped and counted instead.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._identity = (0, 0)  # device and inode of the file written
        self._reopen_failed = False
        if target == "-":
            self._fd = sys.stdout.fileno()
            self._owned = False
        else:
            self._fd = self._open()
            self._owned = True
        self._lines: list[str] = []
        self._size = 0
        self._failed = False
        self._torn = False  # a batch was cut by an error: the next one starts on a new line
        self.dropped = 0  # lines lost: writer too far behind, or the target failing
        self._pending = 0  # bytes handed to the writer and not yet written
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._markers: list[threading.Event] = []
        self._writer = threading.Thread(target=self._write_batches, name="decision-log", daemon=True)
        self._writer.start()

    def write(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _BUFFER_BYTES:
            self.hand_off()

    def hand_off(self) -> None:
        """Give the buffered lines to the writer thread; never blocks."""
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "replace")
        count = len(self._lines)
        self._lines.clear()
        self._size = 0
        with self._lock:
            if self._pending + len(data) > MAX_PENDING_BYTES:
                self.dropped += count
                return
            self._pending += len(data)
        self._queue.put(data)

    def flush(self) -> None:
        """Hand off and wait until everything handed off is written (shutdown, tests)."""
        self.hand_off()
        done = threading.Event()
        self._markers.append(done)
        self._queue.put(b"")  # a marker: everything before it has been written
        done.wait(timeout=30)

    def _write_batches(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if not data:
                self._markers.pop(0).set()
                continue
            self._write(data)
            with self._lock:
                self._pending -= len(data)

    def _open(self, follow_links: bool = True) -> int:
        # After a rotation: no symbolic link, and no wait on a FIFO that nobody reads.
        flags = (
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | (0 if follow_links else os.O_NOFOLLOW | os.O_NONBLOCK)
        )
        fd = os.open(self.target, flags, 0o600)
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)
        return fd

    def _follow_rotation(self) -> None:
        """Reopen the path when it names another file than ours (or none): rotated away."""
        try:
            stat = os.stat(self.target)
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        except OSError as error:  # cannot tell: keep writing to the file we have
            self._reopen_failed_once(error)
            return
        try:
            # What is at the path now was put there by the rotation: a symbolic link planted
            # there is refused rather than followed, and only a regular file is written.
            fd = self._open(follow_links=False)
            if not S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(f"{self.target} is not a regular file")
        except OSError as error:  # keep writing to the file we have
            self._reopen_failed_once(error)
            return
        self._reopen_failed = False
        os.close(self._fd)
        self._fd = fd

    def _reopen_failed_once(self, error: OSError) -> None:
        if not self._reopen_failed:  # once, not once per batch
            log.warning("decision log %s: cannot follow a rotation: %s", self.target, error)
        self._reopen_failed = True

    def _write(self, data: bytes) -> None:
        if self._owned:
            self._follow_rotation()
        if self._torn:
            data = b"\n" + data
        written_any = False
        try:
            while data:
                written = os.write(self._fd, data)
                written_any = written_any or written > 0
                data = data[written:]
            self._failed = self._torn = False
        except OSError as error:
            self._torn = self._torn or written_any
            self.dropped += data.count(b"\n")
            if not self._failed:  # once per outage, not once per batch
                log.warning("decision log %s: lines lost: %s", self.target, error)
            self._failed = True

    def close(self) -> None:
        if not self._writer.is_alive():
            return
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=30)
        if self._owned:
            os.close(self._fd)
            self._owned = False


def _telemetry(snapshot: TelemetrySnapshot) -> dict[str, Any]:
    backends = {}
    for name, stats in snapshot.backends.items():
        fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if f.name != "name"}
        fields["labels"] = dict(stats.labels)
        # JSON has no infinity: a backend never heard from has age null.
        if fields["age_s"] == float("inf"):
            fields["age_s"] = None
        backends[name] = fields
    return {"version": snapshot.version, "load": snapshot.load, "backends": backends}


# What Python's JSON reader takes and strict readers (jq, JSON.parse) refuse: NaN and infinities,
# and \uD800-\uDFFF escapes (a lone one is no character; pairs match too). A body holding any is
# written from its parsed form, where parse_body has made each lone surrogate U+FFFD already.
_NOT_STRICT = re.compile(rb"NaN|Infinity|\\u[dD][89a-fA-F]")


def _finite(value: Any) -> Any:
    """The parsed body with its non-finite numbers (JSON has none) as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def _body(attrs: RequestAttributes, body: Any) -> str:
    """The body as JSON text: the parsed body's own bytes when they are UTF-8 (no re-encoding),
    else the body as text."""
    if body is not None:
        # json.loads also reads UTF-16/32 and a BOM, whose bytes decode as UTF-8 with NULs or a
        # BOM in them: such a line would not read back, and the request would vanish from audit.
        plain = json.detect_encoding(attrs.body) == "utf-8" and b"\x00" not in attrs.body
        try:
            text = attrs.body.decode("utf-8") if plain else ""
        except UnicodeDecodeError:
            plain = False
        if not plain or _NOT_STRICT.search(attrs.body):
            try:
                return '"body":' + json.dumps(_finite(body), separators=(",", ":"), allow_nan=False)
            except RecursionError:  # nested as deep as the reader allowed: kept as text instead
                body = None
        if body is None:
            return _raw_body(attrs)
        # Outside strings, JSON whitespace; inside, a raw line break is invalid: one line either way.
        return '"body":' + text.replace("\n", " ").replace("\r", " ")
    return _raw_body(attrs)


def _raw_body(attrs: RequestAttributes) -> str:
    if not attrs.body:
        return '"body":null'
    raw = attrs.body[:MAX_RAW_BODY].decode("utf-8", "replace")
    cut = "true" if len(attrs.body) > MAX_RAW_BODY else "false"
    return f'"body":null,"raw_body":{json.dumps(raw)},"raw_body_cut":{cut}'


class DecisionLog:
    """Builds decision records and writes the ones the policy keeps."""

    def __init__(
        self,
        sink: LogSink,
        policy: LogPolicy = LogPolicy(),
        secrets: SecretMode = "hash",
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._sink = sink
        self._policy = policy
        self._secrets = secrets
        self._draw = draw
        self._telemetry_cache: tuple[TelemetrySnapshot | None, str] = (None, "null")

    def keeps(self, decision: Decision) -> bool:
        return self._policy.keeps(decision.allowed, self._draw)

    def write(self, line: str) -> None:
        self._sink.write(line)

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (the periodic flush: never blocks)."""
        self._sink.hand_off()

    def close(self) -> None:
        self._sink.close()

    def _snapshot(self, snapshot: TelemetrySnapshot) -> str:
        # A snapshot object is reused until its content changes: encode each one once.
        cached, encoded = self._telemetry_cache
        if cached is not snapshot:
            encoded = json.dumps(_telemetry(snapshot), separators=(",", ":"))
            self._telemetry_cache = (snapshot, encoded)
        return encoded

    def record(self, *args: Any) -> dict[str, Any]:
        """The record `line(*args)` writes, as a dict."""
        record: dict[str, Any] = json.loads(self.line(*args))
        return record

    def line(
        self,
        attrs: RequestAttributes,
        body: Any,
        llm: LlmRequest,
        decision: Decision,
        telemetry: TelemetrySnapshot,
        timing: Timing,
        ids: tuple[str, str],
        secret_headers: Iterable[str],
        tenant: tuple[str, str],
    ) -> str:
        """One JSON line for a decision; `ids` = (trace id, span id) in hex or empty,
        `tenant` = (credential kind, key id) of the resolved tenant. The body and the telemetry
        snapshot come last, spliced in as JSON text (the costly parts to encode)."""
        secret = CREDENTIAL_HEADERS.union(secret_headers)
        when = attrs.time or datetime.fromtimestamp(timing.start_ns / 1e9, UTC)
        head = {
            "type": RECORD_TYPE,
            "time": datetime.fromtimestamp(timing.start_ns / 1e9, UTC).isoformat(timespec="microseconds"),
            "request_id": attrs.id,
            "trace_id": ids[0],
            "span_id": ids[1],
            "tenant": decision.tenant,
            "credential": tenant[0],
            "key_id": tenant[1],
            "decision": "allow" if decision.allowed else "deny",
            "status": decision.status,
            "reason": decision.reason,
            "fired": [{"rule": f.id, "effect": f.effect, "dry_run": f.dry_run} for f in decision.fired],
            "dry_run": [{"rule": f.id, "effect": f.effect} for f in decision.dry_run],
            "errors": list(decision.errors),
            "route": decision.route,
            "canary": dict(decision.canary),
            "bundle": decision.bundle_version,
            "latency_ms": round(timing.latency_s * 1000, 3),
            "eval_us": round(timing.eval_s * 1e6, 1),
            "model": llm.model,
            "kind": llm.kind,
            "prompt_tokens": llm.prompt_tokens,
            "max_tokens": llm.max_tokens,
            "quota": [
                {
                    "rule": f"{q.policy}/{q.limit_name}",
                    "kind": q.kind,
                    "used": q.used,
                    "cost": q.cost,
                    "limit": q.limit,
                    "remaining": q.remaining,
                    "exceeded": q.exceeded,
                }
                for q in decision.quota
            ],
            "input": {
                "method": attrs.method,
                "path": redact_path(attrs.path, self._secrets),
                "host": attrs.host,
                "scheme": attrs.scheme,
                "protocol": attrs.protocol,
                "headers": redact_headers(attrs.headers, secret, self._secrets),
                "truncated": attrs.body_truncated,
                "size": attrs.size,
                "time": when.isoformat(),
                "source": _peer(attrs.source),
                "destination": _peer(attrs.destination),
                "context": dict(attrs.context),
            },
        }
        text = json.dumps(head, separators=(",", ":"), default=str)
        return f'{text[:-1]},{_body(attrs, body)},"telemetry":{self._snapshot(telemetry)}}}\n'
