"""POST /v1/responses through the in-process gateway in front of a scripted decode worker
(fixtures: test_gateway_server.py), read with the official openai client: the request reaches
the worker as the same chat would, and the answer comes back as output items, whole and as the
Responses stream's events."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.unit.test_gateway_server import (
    REPLY,
    Mesh,
    MeshFactory,
    replying,
)

MODEL = "SmolLM2-135M-Instruct"
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL: Any = {"type": "function", "name": "get_weather", "description": "d", "parameters": PARAMS}


async def test_a_text_answer_whole_and_streamed(mesh: Mesh) -> None:
    client = mesh.client()
    out = await client.responses.create(model=MODEL, input="Hi!", instructions="Be brief.")
    assert out.status == "completed" and out.output_text == REPLY
    assert [item.type for item in out.output] == ["message"]
    assert out.usage is not None and out.usage.output_tokens == len(mesh.reply_ids) + 1
    sent = list(mesh.workers[0].requests[-1].prompt_token_ids)
    tok = mesh.gateway.core.model.tokenizer
    system_and_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert sent == tok.encode_chat(system_and_user)

    events = [e async for e in await client.responses.create(model=MODEL, input="Hi!", stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY  # type: ignore[union-attr]


async def test_max_output_tokens_leaves_the_response_incomplete(mesh: Mesh) -> None:
    out = await mesh.client().responses.create(model=MODEL, input="Hi!", max_output_tokens=3)
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens" and out.usage.output_tokens == 3  # type: ignore[union-attr]


async def test_function_calls_round_trip(mesh_factory: MeshFactory) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    mesh = await replying(mesh_factory, call)
    client = mesh.client()
    out = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL])
    [item] = out.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris"} and item.call_id.startswith("call_")

    events = [
        e async for e in await client.responses.create(model=MODEL, input="Paris?", tools=[TOOL], stream=True)
    ]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}

    # the call and its output sent back reach the worker as the same chat's assistant call and tool answer
    history: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "Sunny"},
    ]
    await client.responses.create(model=MODEL, input=history, tools=[TOOL])
    by_responses = list(mesh.workers[0].requests[-1].prompt_token_ids)
    function = {"name": item.name, "arguments": item.arguments}
    chat: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": item.call_id, "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": item.call_id, "content": "Sunny"},
    ]
    tools: Any = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    await client.chat.completions.create(model=MODEL, messages=chat, tools=tools)
    assert by_responses == list(mesh.workers[0].requests[-1].prompt_token_ids)
    assert "Sunny" in mesh.gateway.core.model.tokenizer.decode(by_responses)


async def test_reasoning_comes_first_as_its_own_item(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, "<think>Easy.</think>Paris.", reasoning_parser="qwen3")
    out = await mesh.client().responses.create(model=MODEL, input="Capital of France?")
    reasoning, message = out.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Easy."  # type: ignore[union-attr,index]
    assert message.type == "message" and out.output_text == "Paris."


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "image", "image_url": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].type"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "x", "n": 2}, "n"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(mesh: Mesh, body: dict[str, Any], param: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(mesh.http + "/v1/responses", json=body) as r:
        error = await r.json()
    assert r.status == 400 and error["error"]["param"] == param, error


async def test_the_client_reads_an_error_before_the_stream(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError):
        await mesh.client().responses.create(model=MODEL, input="x", max_output_tokens=0, stream=True)


async def test_a_failure_mid_stream_ends_it_with_an_error_event(mesh_factory: MeshFactory) -> None:
    """The worker aborts after 4 tokens and no move is allowed: the events so far, then `error`."""
    mesh = await mesh_factory(worker_kw=[{"abort_after": 4}], migration_limit=0)
    body = {"model": MODEL, "input": "Hi!", "stream": True}
    async with aiohttp.ClientSession() as session, session.post(mesh.http + "/v1/responses", json=body) as r:
        raw = (await r.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    kinds = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert r.status == 200 and kinds[0] == "response.created" and kinds[-1] == "error", kinds
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    error = json.loads(blocks[-1].split("\n")[1].removeprefix("data: "))
    assert error["type"] == "error" and error["message"] and error["sequence_number"] == len(blocks) - 1


async def test_a_named_tool_choice_and_a_text_format_reach_the_worker_as_grammars(
    mesh_factory: MeshFactory,
) -> None:
    from scalellm.types.proto import sampling_from_proto

    mesh = await replying(mesh_factory, '{"city": "Rome"}')
    client = mesh.client()
    named: Any = {"type": "function", "name": "get_weather"}
    stream = await client.responses.create(
        model=MODEL, input="Rome?", tools=[TOOL], tool_choice=named, stream=True
    )
    events = [e async for e in stream]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == json.loads(done.arguments) == {"city": "Rome"}
    grammar = sampling_from_proto(mesh.workers[0].requests[-1].sampling).structured_output
    assert grammar is not None and json.loads(grammar.spec) == PARAMS

    fmt: Any = {"format": {"type": "json_schema", "name": "place", "schema": PARAMS}}
    out = await client.responses.create(model=MODEL, input="A city as JSON", text=fmt)
    assert json.loads(out.output_text) == {"city": "Rome"}
    grammar = sampling_from_proto(mesh.workers[0].requests[-1].sampling).structured_output
    assert grammar is not None and json.loads(grammar.spec) == PARAMS
