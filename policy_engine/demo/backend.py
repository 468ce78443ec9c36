"""A simulated OpenAI-compatible model backend for the demo and the end-to-end tests.

Answers chat and completion requests (JSON or an SSE stream with a final `usage` chunk when
`stream_options.include_usage` is set) and embeddings, each reporting token usage the way
vLLM and hosted APIs do. Every answer names the backend in `x-backend`, so a test can see
where Envoy sent a request. Behaviour can be changed at run time with POST /admin/config.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policy_engine.cel.library import estimate_tokens


@dataclass
class BackendBehaviour:
    completion_tokens: int = 20
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0  # between SSE chunks
    status: int = 200


class BackendServer:
    """One backend on 127.0.0.1 in a background thread; `port` is chosen by the OS."""

    def __init__(self, name: str, port: int = 0, behaviour: BackendBehaviour | None = None) -> None:
        self.name = name
        self.behaviour = behaviour or BackendBehaviour()
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"backend-{name}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> BackendServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self) -> None:
        with self._lock:
            self.requests += 1


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _handler(backend: BackendServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # tests and the demo report traffic themselves

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-backend", backend.name)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send_json(200, {"status": "ok", "backend": backend.name})
            elif self.path == "/admin/config":
                self._send_json(200, asdict(backend.behaviour))
            else:
                self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            if self.path == "/admin/config":
                for key, value in body.items():
                    if hasattr(backend.behaviour, key):
                        setattr(backend.behaviour, key, type(getattr(backend.behaviour, key))(value))
                self._send_json(200, asdict(backend.behaviour))
                return
            backend.count()
            behaviour = backend.behaviour
            if behaviour.latency_ms:
                time.sleep(behaviour.latency_ms / 1000)
            if behaviour.status != 200:
                self._send_json(
                    behaviour.status, {"error": {"message": "backend error", "type": "server_error"}}
                )
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
                return
            messages = body.get("messages")
            text = (
                " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
                if isinstance(messages, list)
                else str(body.get("prompt", ""))
            )
            prompt = estimate_tokens(text)
            completion = behaviour.completion_tokens
            if body.get("stream") is True:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                self._stream(model, prompt, completion, include_usage, behaviour.chunk_delay_ms)
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

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
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
                event = {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}],
                }
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                if delay_ms and index < completion - 1:
                    time.sleep(delay_ms / 1000)
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
