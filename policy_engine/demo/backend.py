"""A simulated OpenAI-compatible model backend for the demo and the end-to-end tests.

Answers chat and completion requests (JSON or an SSE stream with a final `usage` chunk when
`stream_options.include_usage` is set; `/v1/messages` in the shape of Anthropic's Messages
API), embeddings, image generations and audio transcriptions, the text ones reporting token
usage the way vLLM and hosted APIs do. Every answer names the
backend in `x-backend`, so a test can see where Envoy sent a request. Behaviour can be changed
at run time with POST /admin/config.

It also behaves like a loaded model server, enough for live telemetry to have something to see:
at most `capacity` requests are served at once and the rest wait in a FIFO queue, each served
request takes `latency_ms` (the "prefill" before the first token), `error_rate` of the requests
fail with 500, and `paused` makes the whole server hang (connections are accepted, nothing is
answered) except the admin endpoint, so a test can unpause it. GET /metrics exports vLLM's metric
names: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
(running / capacity), the `vllm:time_to_first_token_seconds` and `vllm:e2e_request_latency_seconds`
histograms, and request and token counters.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from policy_engine.cel.library import estimate_tokens

# vLLM's own bucket bounds, so scrapers see the layout they would see in production.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# How often blocked requests re-read the behaviour: tests may change fields directly,
# without the admin endpoint's notification.
_POLL_S = 0.05


PROVIDER_RATE_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-tokens": "30ms",
}


@dataclass
class BackendBehaviour:
    completion_tokens: int = 20
    latency_ms: float = 0.0  # per served request, after it leaves the queue
    chunk_delay_ms: float = 0.0  # between SSE chunks
    status: int = 200  # any other value answers every request with it
    capacity: int = 8  # requests served at once; more wait in the queue (0 or less: unlimited)
    error_rate: float = 0.0  # fraction of served requests answered 500
    paused: bool = False  # hang: accept connections, answer nothing but /admin/config
    # Prompt tokens an Anthropic-style answer reports as read from its prompt cache
    # (`cache_read_input_tokens`), on top of `input_tokens`, which leaves them out.
    cached_prompt_tokens: int = 0
    # Answer JSON with a hosted API's own rate-limit headers (its account's limits), as OpenAI's
    # API does: the gateway answers with its tenants' budgets instead.
    provider_rate_headers: bool = False
    # An Anthropic-style stream fails after its first token (an `overloaded_error` event, as
    # Anthropic's API sends mid-stream): no message_delta, so no usage beyond message_start's.
    stream_error: bool = False


class _Metrics:
    def __init__(self, backend: BackendServer) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        model = ["model_name"]
        name = backend.name
        Gauge("vllm:num_requests_running", "Requests being served.", model, registry=registry).labels(
            name
        ).set_function(lambda: backend.running)
        Gauge("vllm:num_requests_waiting", "Requests waiting to be served.", model, registry=registry).labels(
            name
        ).set_function(lambda: backend.waiting)
        Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1.", model, registry=registry).labels(
            name
        ).set_function(backend.kv_cache_usage)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            model,
            buckets=TTFT_BUCKETS,
            registry=registry,
        ).labels(name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            model,
            buckets=E2E_BUCKETS,
            registry=registry,
        ).labels(name)
        self.success = Counter(
            "vllm:request_success", "Finished requests.", [*model, "finished_reason"], registry=registry
        ).labels(name, "stop")
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", model, registry=registry
        ).labels(name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", model, registry=registry
        ).labels(name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of new connections from Envoy overflows
    # it while the accepting thread waits for a core, and a dropped SYN is retried after 1 s,
    # Envoy's connect timeout (a 503 "connection timeout" seen in a loaded CI run). Model
    # servers listen with far larger backlogs (uvicorn: 2048).
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a slow or paused backend is expected here, not an error.
        return


class BackendServer:
    """One backend on 127.0.0.1 in a background thread; `port` is chosen by the OS."""

    def __init__(self, name: str, port: int = 0, behaviour: BackendBehaviour | None = None) -> None:
        self.name = name
        self.behaviour = behaviour or BackendBehaviour()
        self.requests = 0
        self.last_headers: dict[str, str] = {}  # of the last model request, names lower-cased
        self._lock = threading.Lock()
        self._slots = threading.Condition()
        self._running = 0
        self._queue: deque[object] = deque()
        self._stopping = False
        self._random = random.Random()
        self.metrics = _Metrics(self)
        self._server = _Server(("127.0.0.1", port), _handler(self))
        self._thread = threading.Thread(
            # A short poll interval only makes stop() quicker (shutdown waits for the next poll).
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"backend-{name}",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def kv_cache_usage(self) -> float:
        capacity = self.behaviour.capacity
        return min(self._running / capacity, 1.0) if capacity > 0 else 0.0

    def start(self) -> BackendServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._slots:
            self._stopping = True  # releases paused and queued requests
            self._slots.notify_all()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def count(self, headers: Any = None) -> None:
        with self._lock:
            self.requests += 1
            if headers is not None:
                self.last_headers = {name.lower(): value for name, value in headers.items()}

    def changed(self) -> None:
        """Wake blocked requests now instead of at their next poll (capacity, pause)."""
        with self._slots:
            self._slots.notify_all()

    def hold(self) -> bool:
        """Block while paused; False if the server is stopping."""
        with self._slots:
            while self.behaviour.paused and not self._stopping:
                self._slots.wait(_POLL_S)
            return not self._stopping

    def admit(self) -> bool:
        """Wait for a serving slot in arrival order; False if the server is stopping."""
        ticket = object()
        with self._slots:
            self._queue.append(ticket)
            try:
                while not self._stopping:
                    capacity = self.behaviour.capacity
                    free = capacity <= 0 or self._running < capacity
                    if free and not self.behaviour.paused and self._queue[0] is ticket:
                        self._queue.popleft()
                        self._running += 1
                        self._slots.notify_all()  # the next in line may fit too
                        return True
                    self._slots.wait(_POLL_S)
                return False
            finally:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._slots.notify_all()

    def release(self) -> None:
        with self._slots:
            self._running -= 1
            self._slots.notify_all()

    def fails(self) -> bool:
        rate = self.behaviour.error_rate
        return rate > 0 and self._random.random() < rate

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply admin changes to known behaviour fields; ValueError on a bad value."""
        known = {f.name: f for f in fields(BackendBehaviour)}
        parsed: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                continue
            current = getattr(self.behaviour, key)
            if isinstance(current, bool):
                parsed[key] = _boolean(value)
            elif isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"{key}: expected a number, got {value!r}")
            else:
                parsed[key] = type(current)(float(value)) if isinstance(current, int) else float(value)
        for key, value in parsed.items():
            setattr(self.behaviour, key, value)
        self.changed()


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def length_of(headers: Any) -> int:
    try:
        return max(0, int(headers.get("content-length") or 0))
    except ValueError:
        return 0


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _anthropic_message(
    model: str, backend: str, prompt: int, completion: int, cached: int = 0
) -> dict[str, Any]:
    """An answer of Anthropic's Messages API (`/v1/messages`): its usage has no total, and the
    prompt tokens read from the cache are apart from `input_tokens`."""
    usage = {"input_tokens": prompt, "output_tokens": completion}
    if cached:
        usage["cache_read_input_tokens"] = cached
    return {
        "id": "msg-1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "backend": backend,
        "content": [{"type": "text", "text": " ".join(["token"] * completion)}],
        "stop_reason": "end_turn",
        "usage": usage,
    }


def _handler(backend: BackendServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # tests and the demo report traffic themselves

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.send_header("x-backend", backend.name)
            if backend.behaviour.provider_rate_headers:
                for name, value in PROVIDER_RATE_HEADERS.items():
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _hung_up(self) -> None:
            self.close_connection = True  # the server is stopping: drop the request unanswered

        def do_GET(self) -> None:
            if self.path == "/admin/config":
                self._send_json(200, asdict(backend.behaviour))
                return
            if not backend.hold():
                self._hung_up()
            elif self.path == "/health":
                self._send_json(200, {"status": "ok", "backend": backend.name})
            elif self.path == "/metrics":
                self._send(200, backend.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

        def do_POST(self) -> None:
            arrived = time.monotonic()
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            if self.path == "/admin/config":
                try:
                    backend.configure(body)
                except (TypeError, ValueError) as error:
                    self._send_json(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
                    return
                self._send_json(200, asdict(backend.behaviour))
                return
            backend.count(self.headers)
            if not backend.hold() or not backend.admit():
                self._hung_up()
                return
            try:
                self._serve(body, arrived)
            finally:
                backend.release()

        def _serve(self, body: dict[str, Any], arrived: float) -> None:
            behaviour = backend.behaviour
            if behaviour.latency_ms:
                time.sleep(behaviour.latency_ms / 1000)
            if behaviour.status != 200 or backend.fails():
                status = behaviour.status if behaviour.status != 200 else 500
                self._send_json(status, {"error": {"message": "backend error", "type": "server_error"}})
                return
            model = str(body.get("model", ""))
            if self.path.endswith("/embeddings"):
                inputs = body.get("input")
                texts = inputs if isinstance(inputs, list) else [inputs]
                prompt = sum(estimate_tokens(t) for t in texts if isinstance(t, str))
                data = [
                    {"object": "embedding", "index": i, "embedding": [0.0] * 8} for i in range(len(texts))
                ]
                self._send_json(
                    200, {"object": "list", "data": data, "model": model, "usage": _usage(prompt, 0)}
                )
                self._finished(arrived, prompt, 0)
                return
            if "/images/" in self.path:
                prompt = estimate_tokens(str(body.get("prompt", "")))
                n = body.get("n")
                count = n if isinstance(n, int) and 0 < n <= 10 else 1
                # A 1x1 transparent PNG: the shape of the answer matters here, not the picture.
                pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="  # noqa: E501
                self._send_json(
                    200,
                    {
                        "created": int(time.time()),
                        "data": [{"b64_json": pixel} for _ in range(count)],
                        "model": model,
                    },
                )
                self._finished(arrived, prompt, 0)
                return
            if "/audio/" in self.path:
                # Multipart bodies are not parsed: the length stands in for the audio's duration.
                seconds = max(1, length_of(self.headers) // 16000)
                self._send_json(
                    200,
                    {
                        "text": "simulated transcription",
                        "model": model,
                        "usage": {"type": "duration", "seconds": seconds},
                    },
                )
                self._finished(arrived, 0, 0)
                return
            messages = body.get("messages")
            text = (
                " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
                if isinstance(messages, list)
                else str(body.get("prompt", ""))
            )
            prompt = estimate_tokens(text)
            completion = behaviour.completion_tokens
            backend.metrics.ttft.observe(time.monotonic() - arrived)
            if self.path.endswith("/messages"):
                if body.get("stream") is True:
                    self._anthropic_stream(model, prompt, completion, behaviour)
                else:
                    message = _anthropic_message(
                        model, backend.name, prompt, completion, behaviour.cached_prompt_tokens
                    )
                    self._send_json(200, message)
                self._finished(arrived, prompt, completion)
                return
            if body.get("stream") is True:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                self._stream(model, prompt, completion, include_usage, behaviour.chunk_delay_ms)
                self._finished(arrived, prompt, completion)
                return
            answer = " ".join(["token"] * completion)
            self._send_json(
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "model": model,
                    "backend": backend.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(prompt, completion),
                },
            )
            self._finished(arrived, prompt, completion)

        def _finished(self, arrived: float, prompt: int, completion: int) -> None:
            metrics = backend.metrics
            metrics.e2e.observe(time.monotonic() - arrived)
            metrics.success.inc()
            metrics.prompt_tokens.inc(prompt)
            metrics.generation_tokens.inc(completion)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _anthropic_stream(
            self, model: str, prompt: int, completion: int, behaviour: BackendBehaviour
        ) -> None:
            # As Anthropic's Messages API streams: the input tokens in message_start, the output
            # so far in each message_delta (the last one is final).
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-backend", backend.name)
            self.end_headers()
            delay_ms = behaviour.chunk_delay_ms
            start = _anthropic_message(model, backend.name, prompt, 1, behaviour.cached_prompt_tokens)
            start["content"] = []
            events: list[tuple[str, dict[str, Any]]] = [
                ("message_start", {"type": "message_start", "message": start})
            ]
            events.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            for _ in range(completion):
                delta = {"type": "text_delta", "text": "token "}
                events.append(
                    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                )
            if behaviour.stream_error:
                error = {"type": "overloaded_error", "message": "Overloaded"}
                events[3:] = [("error", {"type": "error", "error": error})]
            else:
                events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
                events.append(
                    (
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": completion},
                        },
                    )
                )
                events.append(("message_stop", {"type": "message_stop"}))
            for name, event in events:
                self._chunk(f"event: {name}\ndata: {json.dumps(event)}\n\n".encode())
                if delay_ms and name == "content_block_delta":
                    time.sleep(delay_ms / 1000)
                if not backend.hold():
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _stream(
            self, model: str, prompt: int, completion: int, include_usage: bool, delay_ms: float
        ) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-backend", backend.name)
            self.end_headers()
            for index in range(completion):
                event: dict[str, object] = {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}],
                }
                if include_usage:  # as OpenAI sends them: every chunk says null until the last
                    event["usage"] = None
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                if delay_ms and index < completion - 1:
                    time.sleep(delay_ms / 1000)
                if not backend.hold():  # a pause also freezes streams already under way
                    self.close_connection = True
                    return
            if include_usage:
                final = {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": _usage(prompt, completion),
                }
                self._chunk(f"data: {json.dumps(final)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler
