"""--reasoning-parser through the in-process gateway in front of a scripted decode worker
(fixtures: test_gateway_server.py): the worker's reply holds a <think> block, and the official
openai client reads it back as reasoning_content (and reasoning), whole and streamed, with the
answer as content; tool calls are read from the content only; the history may send reasoning back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.gateway.openai_parse import parse_chat
from services.gateway.request import GatewayError
from tests.unit.test_gateway_server import (
    MeshFactory,
    replying,
)

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
THINKING = {"reasoning_parser": "qwen3"}
THOUGHT = "<think>\nThe user asks about France. Its capital is Paris.\n</think>\n\nParis."


def reasoning_of(message: Any) -> Any:
    """The reasoning, sent under both names (vLLM's `reasoning` and the `reasoning_content` most
    other servers and clients use), always alike."""
    extra = message.model_extra or {}
    assert extra.get("reasoning") == extra.get("reasoning_content"), extra
    return extra.get("reasoning_content")


async def test_the_think_block_is_reasoning_content_whole_and_streamed(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, THOUGHT, **THINKING)
    client = mesh.client()
    out = await client.chat.completions.create(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    message = out.choices[0].message
    assert reasoning_of(message) == "\nThe user asks about France. Its capital is Paris.\n"
    assert message.content == "\n\nParis." and out.choices[0].finish_reason == "stop"

    stream = await client.chat.completions.create(model=MODEL, messages=ASK, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
    assert "".join(reasoning_of(d) or "" for d in deltas) == reasoning_of(message)
    assert "".join(d.content or "" for d in deltas) == message.content
    assert not any("think>" in (d.content or "") + (reasoning_of(d) or "") for d in deltas)
    assert deltas[0].role == "assistant"


async def test_without_the_parser_the_text_is_the_answer(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, THOUGHT)  # no reasoning parser
    out = await mesh.client().chat.completions.create(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    assert out.choices[0].message.content == THOUGHT and reasoning_of(out.choices[0].message) is None


async def test_an_answer_cut_off_while_reasoning_has_no_content(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, THOUGHT, **THINKING)
    out = await mesh.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=6)  # type: ignore[arg-type]
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "length" and message.content is None
    assert reasoning_of(message) and THOUGHT.startswith("<think>" + reasoning_of(message))


async def test_a_prompt_that_opened_the_block_starts_the_answer_inside_it(mesh_factory: MeshFactory) -> None:
    """DeepSeek-R1's template ends the prompt with <think>: the reply holds only the closing tag.
    Here the prompt opens it with continue_final_message."""
    mesh = await replying(mesh_factory, "Paris, surely.</think>Paris.", **THINKING)
    opened = [*ASK, {"role": "assistant", "content": "<think>\n"}]
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    out = await mesh.client().chat.completions.create(model=MODEL, messages=opened, extra_body=extra)  # type: ignore[arg-type]
    assert (reasoning_of(out.choices[0].message), out.choices[0].message.content) == (
        "Paris, surely.",
        "Paris.",
    )


async def test_tool_calls_are_read_after_the_reasoning(mesh_factory: MeshFactory) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    mesh = await replying(mesh_factory, "<think>A tool helps.</think>" + call, **THINKING)
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    out = await mesh.client().chat.completions.create(model=MODEL, messages=ASK, tools=tools)  # type: ignore[arg-type]
    choice = out.choices[0]
    assert reasoning_of(choice.message) == "A tool helps." and choice.finish_reason == "tool_calls"
    [made] = choice.message.tool_calls or []
    assert json.loads(made.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_the_history_may_send_an_assistants_reasoning_back() -> None:
    said = {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital."}
    call = parse_chat({"messages": [*ASK, said, {"role": "user", "content": "Sure?"}]})
    message = call.spec.prompt.messages[1]
    assert message.reasoning == "France's capital."
    assert message.to_template()["reasoning_content"] == "France's capital."
    newer = parse_chat({"messages": [*ASK, {"role": "assistant", "content": "Paris.", "reasoning": "r"}]})
    assert newer.spec.prompt.messages[1].reasoning == "r"
    for bad in (
        {"role": "user", "content": "x", "reasoning_content": "r"},
        {"role": "assistant", "content": "x", "reasoning_content": "r", "reasoning": "s"},
        {"role": "assistant", "content": "x", "reasoning_content": 5},
    ):
        with pytest.raises(GatewayError):
            parse_chat({"messages": [*ASK, bad]})
