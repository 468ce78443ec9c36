"""What a decision is made on: the request as Envoy saw it, and what it asks of a model.

Everything here tolerates hostile input: a body that is not JSON, a field of the wrong type
or a missing header gives empty values, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from policy_engine.cel.library import estimate_tokens

_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)")
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_MODEL_PART = re.compile(
    rb'^content-disposition:[^\n]*;\s*name="?model"?\s*(;|\r?$)', re.IGNORECASE | re.MULTILINE
)


# Slotted, not frozen, for speed as in decision.py: values all the same, never assigned to.
@dataclass(slots=True)
class Peer:
    principal: str = ""
    address: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        match = _SPIFFE.match(self.principal)
        return match.group(1) if match else ""

    @property
    def service_account(self) -> str:
        match = _SPIFFE.match(self.principal)
        return match.group(2) if match else ""


@dataclass(slots=True)
class RequestAttributes:
    method: str = "GET"
    path: str = "/"
    host: str = ""
    scheme: str = "http"
    protocol: str = ""
    id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    body_truncated: bool = False
    size: int = -1  # announced size; -1 = unknown (use len(body))
    time: datetime | None = None
    source: Peer = field(default_factory=Peer)
    destination: Peer = field(default_factory=Peer)
    context: Mapping[str, str] = field(default_factory=dict)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        if "?" not in self.path:
            return {}
        return dict(parse_qsl(self.path.split("?", 1)[1], keep_blank_values=True))


@dataclass(slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(slots=True)
class LlmRequest:
    model: str = ""
    kind: str = "other"
    stream: bool = False
    max_tokens: int = 0
    choices: int = 1
    temperature: float = 0.0
    user: str = ""
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    prompt_tokens: int = 0


_KINDS = (
    ("/chat/completions", "chat"),
    ("/completions", "completion"),
    ("/embeddings", "embedding"),
    ("/images/", "image"),
    ("/audio/", "audio"),
    ("/responses", "chat"),
    ("/messages", "chat"),
)


def request_kind(path: str) -> str:
    # As the backend's server reads the path (percent-decoded; a proxy may merge slashes), not
    # as written: `/v1/chat%2Fcompletions` is a chat request to it.
    if "%" in path or "//" in path:
        path = re.sub("/+", "/", unquote(path))
    for suffix, kind in _KINDS:
        if suffix in path:
            return kind
    return "other"


def parse_body(attrs: RequestAttributes) -> Any:
    """The JSON body, or None when absent, truncated or not JSON."""
    if not attrs.body or attrs.body_truncated:
        return None
    if json.detect_encoding(attrs.body) != "utf-8":
        # A BOM, or UTF-16/32: the standard parser reads them, as the backend's would.
        return _standard(attrs.body)
    head = attrs.body.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    try:
        # orjson is ~3x faster. What it refuses (lone surrogates, NaN, infinities, UTF-16,
        # nesting beyond 1,024) gets the standard parser's answer below; the one difference
        # in what both accept, integers beyond 64 bits read as doubles, is what CEL makes of
        # every JSON number anyway.
        return orjson.loads(attrs.body)
    except orjson.JSONDecodeError:
        pass
    return _standard(attrs.body)


def _standard(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    # The standard parser lets lone surrogates through, escaped ("\\ud800") or as raw UTF-8
    # bytes (it decodes with surrogatepass): such text is not Unicode and no protobuf string can
    # hold it, so each lone half becomes U+FFFD, as a decoder would make it.
    # Only bodies that can hold one are walked: a surrogate escaped or in UTF-8 bytes, or any
    # UTF-16/32 body (NUL bytes, which UTF-8 JSON cannot contain).
    if b"\x00" in raw or _SURROGATE.search(raw):
        body = _without_lone_surrogates(body)
    return body


# A UTF-16 surrogate, escaped or as the UTF-8 bytes surrogatepass decodes (a pair is fine too).
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _repaired(text: str) -> str:
    return text if text.isascii() else text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _without_lone_surrogates(value: Any) -> Any:
    """The parsed body with lone surrogates replaced, containers rebuilt in place: without
    recursion, since a body nested as deep as the parser allows must still read."""
    if isinstance(value, str):
        return _repaired(value)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for index, item in enumerate(node):
                if isinstance(item, str):
                    node[index] = _repaired(item)
                elif isinstance(item, list | dict):
                    stack.append(item)
        elif isinstance(node, dict):
            items = [(_repaired(key), item) for key, item in node.items()]
            node.clear()
            for key, item in items:
                if isinstance(item, str):
                    item = _repaired(item)
                elif isinstance(item, list | dict):
                    stack.append(item)
                node[key] = item
    return value


def _text(value: Any) -> str:
    """Text of a message content: a string, or the text parts of a multi-part list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                # text (chat, Responses API input_text/output_text), refusal (an assistant part
                # a template renders back to the model)
                parts.extend(part[key] for key in ("text", "refusal") if isinstance(part.get(key), str))
        return "\n".join(parts)
    return ""


def _function_text(items: Any, keys: tuple[str, ...]) -> list[str]:
    """The strings under `keys` of each item's `function`: a chat template renders them to the
    model (a tool's name and description, the arguments of an assistant's tool call)."""
    found: list[str] = []
    if isinstance(items, list):
        for item in items:
            function = item.get("function") if isinstance(item, dict) else None
            if isinstance(function, dict):
                found.extend(function[key] for key in keys if isinstance(function.get(key), str))
    return found


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if value != value or value in (float("inf"), float("-inf")):
        return 0
    return max(-(2**62), min(2**62, int(value)))


_TRUE_STRINGS = frozenset({"true", "1", "yes", "on", "t", "y"})


def _truthy(value: Any) -> bool:
    """A bool as a lax validator reads it (vLLM's pydantic models): true, 1, "true", "yes", ..."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_STRINGS
    return value is True or (not isinstance(value, bool) and isinstance(value, int | float) and value == 1)


_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _token_limit(value: Any) -> int:
    """An output-token limit as a backend reads it: a number, or a string of one (OpenAI-style
    servers validate in lax mode, where "4096" is 4096). Never negative: that would refund."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return 0
        value = number if number.is_integer() else 0
    return max(0, _int(value))


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if value == value else 0.0


def multipart_model(attrs: RequestAttributes) -> str:
    """The `model` field of a multipart form (audio, image edits), parsed as a form server does:
    by the boundary the content-type names, headers before the part's blank line. Empty when
    there is no such field, or more than one (which the backend takes is not ours to guess)."""
    content_type = attrs.headers.get("content-type", "")
    boundary = _BOUNDARY.search(content_type) if "multipart/" in content_type.lower() else None
    if boundary is None or not attrs.body:
        return ""
    values: list[bytes] = []
    for part in attrs.body.split(b"--" + boundary.group(1).encode("latin-1", "replace"))[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            head, separator, content = part.partition(b"\n\n")
        if separator and _MODEL_PART.search(head):
            values.append(content[:-2] if content.endswith(b"\r\n") else content.removesuffix(b"\n"))
    if len(values) != 1 or len(values[0]) > 200:
        return ""
    return values[0].decode("utf-8", "replace").strip()


def llm_request(attrs: RequestAttributes, body: Any, with_messages: bool = True) -> LlmRequest:
    """What the request asks of the model, from an OpenAI-compatible path and body.

    Without ``with_messages`` (no policy reads ``llm.messages``) the messages only make up
    the prompt, and ``messages`` is left empty.
    """
    kind = request_kind(attrs.path_only)
    if not isinstance(body, dict):
        return LlmRequest(model=multipart_model(attrs), kind=kind)
    messages: list[ChatMessage] = []
    texts: list[str] = []
    raw_messages = body.get("messages")
    if isinstance(raw_messages, list):
        for item in raw_messages:
            if isinstance(item, dict):
                role = item.get("role")
                content = item.get("content")
                text = content if type(content) is str else _text(content)
                if with_messages:
                    messages.append(ChatMessage(role if type(role) is str else "", text))
                texts.append(text)
                if "tool_calls" in item:
                    texts.extend(_function_text(item["tool_calls"], ("arguments",)))
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, dict):  # Responses API: messages as input items
                    texts.append(_text(item.get("content")))
    if "tools" in body:
        texts.extend(_function_text(body["tools"], ("name", "description")))
    for key in ("system", "instructions"):  # Anthropic's system, the Responses API's instructions
        system = body.get(key)
        if isinstance(system, str | list):
            texts.insert(0, _text(system))
    prompt = "\n".join(filter(None, texts))
    model_value = body.get("model")
    user_value = body.get("user")
    # Every field a backend may read its output limit from, the largest: vLLM takes
    # max_completion_tokens over max_tokens, and a cap or a reservation read from the other
    # one would be bypassed by sending both.
    max_tokens = max(_token_limit(body.get(name)) for name in _OUTPUT_LIMITS)
    # n completions (best_of generated, n returned) each up to max_tokens: all are generated.
    choices = min(max(1, _token_limit(body.get("n")), _token_limit(body.get("best_of"))), 2**16)
    return LlmRequest(
        model=model_value if isinstance(model_value, str) else "",
        kind=kind,
        stream=_truthy(body.get("stream")),
        max_tokens=max_tokens,
        choices=choices,
        temperature=_float(body.get("temperature")),
        user=user_value if isinstance(user_value, str) else "",
        messages=tuple(messages),
        prompt=prompt,
        prompt_tokens=estimate_tokens(prompt),
    )
