"""The Lua usage reader Envoy runs after each response (USAGE_LUA), run here in LuaJIT (lupa's,
the Lua of Envoy's Lua filter) with a stand-in for Envoy's handle: which token counts it reads
from JSON answers and SSE streams of OpenAI- and Anthropic-style backends, whatever the chunking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from lupa import luajit21

from policy_engine.envoy.bootstrap import USAGE_LUA

# Envoy's handle as USAGE_LUA uses it: response headers, body chunks, dynamic metadata.
_HARNESS = """
function(content_type, chunks)
  local metadata = {}
  local function chunk(bytes)
    return {
      length = function() return #bytes end,
      getBytes = function(_, start, size) return bytes:sub(start + 1, start + size) end,
    }
  end
  local handle = {
    headers = function() return {get = function(_, name)
      if name == "content-type" then return content_type end
    end} end,
    bodyChunks = function()
      local index = 0
      return function()
        index = index + 1
        if chunks[index] == nil then return nil end
        return chunk(chunks[index])
      end
    end,
    streamInfo = function() return {dynamicMetadata = function() return {
      set = function(_, namespace, key, value) metadata[key] = value end,
    } end} end,
  }
  envoy_on_response(handle)
  return metadata.prompt_tokens, metadata.completion_tokens, metadata.total_tokens
end
"""


@pytest.fixture(scope="module")
def read() -> Any:
    lua = luajit21.LuaRuntime(unpack_returned_tuples=True)
    lua.execute(USAGE_LUA)
    harness = lua.eval(_HARNESS)

    def run(content_type: str, chunks: Sequence[str]) -> tuple[int | None, int | None, int | None]:
        prompt, completion, total = harness(content_type, lua.table_from(list(chunks)))
        return tuple(None if v is None else int(v) for v in (prompt, completion, total))  # type: ignore[return-value]

    return run


def sse(*events: dict[str, Any], named: bool = False) -> str:
    return "".join(
        (f"event: {event.get('type')}\n" if named else "") + f"data: {json.dumps(event)}\n\n"
        for event in events
    )


def every_split(text: str) -> list[list[str]]:
    return [[text[:cut], text[cut:]] for cut in range(1, len(text))]


JSON = "application/json"
SSE = "text/event-stream"


def test_openai_json_and_stream(read: Any) -> None:
    answer = json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    )
    assert read(JSON, [answer]) == (3, 4, 7)
    stream = sse({"choices": [], "usage": None}, {"choices": [], "usage": None}) + sse(
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    )
    for chunks in every_split(stream):
        assert read(SSE, chunks) == (3, 4, 7)


def test_anthropic_json_counts_the_cached_prompt_and_adds_a_total(read: Any) -> None:
    usage = {
        "input_tokens": 20,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 7,
        "output_tokens": 9,
    }
    answer = json.dumps({"type": "message", "content": [{"type": "text", "text": "hi"}], "usage": usage})
    assert read(JSON, [answer]) == (32, 9, 41)


def test_anthropic_stream_takes_the_input_from_the_start_and_the_output_from_the_last_delta(
    read: Any,
) -> None:
    stream = sse(
        {
            "type": "message_start",
            "message": {"usage": {"input_tokens": 25, "cache_read_input_tokens": 7, "output_tokens": 1}},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 5000}},
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 10}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
        named=True,
    )
    assert read(SSE, [stream]) == (32, 15, 47)
    for chunks in every_split(stream)[::7]:
        assert read(SSE, chunks) == (32, 15, 47)


def test_openai_responses_stream(read: Any) -> None:
    usage = {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 6,
        "total_tokens": 11,
    }
    stream = sse(
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.completed", "response": {"usage": usage}},
    )
    assert read(SSE, [stream]) == (5, 6, 11)


def test_the_models_own_output_never_sets_the_usage(read: Any) -> None:
    # Text quoting a usage object is escaped in JSON; a tool call's input is raw JSON, which the
    # client's tool schema can shape: only an answer's last usage object counts.
    quoted = {
        "content": [{"type": "text", "text": '"usage": {"input_tokens": 999}'}],
        "usage": {"input_tokens": 2, "output_tokens": 3},
    }
    assert read(JSON, [json.dumps(quoted)]) == (2, 3, 5)
    tool = {
        "content": [
            {"type": "tool_use", "id": "t", "name": "report", "input": {"usage": {"total_tokens": 0}}}
        ],
        "usage": {"input_tokens": 3000, "output_tokens": 900},
    }
    for chunks in [[json.dumps(tool)], *every_split(json.dumps(tool))[::11]]:
        assert read("Application/JSON; charset=utf-8", chunks) == (3000, 900, 3900)


def test_a_stream_without_its_content_type_still_reads_as_one(read: Any) -> None:
    stream = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 1010, "output_tokens": 1}}},
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 20}},
        named=True,
    )
    for content_type in ("", "text/plain", JSON):
        assert read(content_type, [stream]) == (1010, 20, 1030), content_type
    assert read("", [sse({"usage": {"prompt_tokens": 1}}), sse({"usage": {"completion_tokens": 2}})]) == (
        1,
        2,
        3,
    )


def test_a_json_answers_last_usage_counts_even_when_null(read: Any) -> None:
    # The backend reported nothing: the model's tool input must not stand in for it.
    tool = {
        "content": [{"type": "tool_use", "input": {"usage": {"input_tokens": 0, "output_tokens": 0}}}],
        "usage": None,
    }
    assert read(JSON, [json.dumps(tool)]) == (None, None, None)


def test_no_usage_sets_nothing(read: Any) -> None:
    assert read(JSON, ['{"data": []}']) == (None, None, None)
    assert read(SSE, [sse({"choices": [], "usage": None})]) == (None, None, None)
    assert read(JSON, []) == (None, None, None)
