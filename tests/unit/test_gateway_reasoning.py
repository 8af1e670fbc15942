"""--reasoning-parser through the in-process gateway in front of a scripted decode worker
(fixtures: tests/unit/conftest.py): the worker's reply holds a <think> block, and the official
openai client reads it back as reasoning_content (and reasoning), whole and streamed, with the
answer as content; tool calls are read from the content only; the history may send reasoning back.
The gRPC API splits a chat's answer the same way (`reasoning` beside `text`); Mistral's [THINK]
tags are special tokens, which the answer's text keeps for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import tokenizers

from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.openai_parse import parse_chat
from services.gateway.request import GatewayError
from tests.unit.test_gateway_server import (
    Mesh,
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


async def _grpc_chat(mesh: Mesh, n: int = 1) -> list[gateway_pb2.GatewayGenerateResponse]:
    chat = gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role="user", content=ASK[0]["content"])]
    )
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        request = gateway_pb2.GatewayGenerateRequest(chat=chat, n=n)
        return [m async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]


async def test_grpc_chat_answers_carry_the_reasoning_apart(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, THOUGHT, **THINKING)
    messages = await _grpc_chat(mesh, n=2)
    for index in (0, 1):
        mine = [m for m in messages if m.index == index]
        assert "".join(m.reasoning for m in mine) == "\nThe user asks about France. Its capital is Paris.\n"
        assert "".join(m.text for m in mine) == "\n\nParis."
        assert len([m for m in mine if m.reasoning]) > 1  # streamed, not held to the end

    plain = await replying(mesh_factory, THOUGHT)  # no parser: the text as it is
    assert "".join(m.text for m in await _grpc_chat(plain)) == THOUGHT
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:  # not a chat: as it is
        request = gateway_pb2.GatewayGenerateRequest(text="Say hi")
        answer = [m async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]
    assert "".join(m.text for m in answer) == THOUGHT and not any(m.reasoning for m in answer)


MAGISTRAL_THOUGHT = "[THINK]France's capital: Paris.[/THINK]Paris."


@pytest.fixture
def magistral_model(demo_model_dir: Path, tmp_path: Path) -> Path:
    """The demo model's tokenizer with [THINK] and [/THINK] as special tokens, as Magistral's."""
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        if (demo_model_dir / name).exists():
            shutil.copy(demo_model_dir / name, tmp_path / name)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("[THINK]", "[/THINK]")])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


async def test_mistral_think_tags_are_read_from_their_special_tokens(
    mesh_factory: MeshFactory, magistral_model: Path
) -> None:
    """Special tokens leave the text by default, and [THINK] would leave with them: with the mistral
    parser a chat's answer keeps them and splits there; whole, streamed and over gRPC."""
    mesh = await replying(
        mesh_factory, MAGISTRAL_THOUGHT, model_dir=magistral_model, reasoning_parser="mistral"
    )
    tok, name = mesh.gateway.core.model.tokenizer, mesh.gateway.core.model.name
    assert len(tok.encode("[THINK][/THINK]", add_special_tokens=False)) == 2  # two special tokens
    client = mesh.client()
    out = await client.chat.completions.create(model=name, messages=ASK)  # type: ignore[arg-type]
    message = out.choices[0].message
    assert (reasoning_of(message), message.content) == ("France's capital: Paris.", "Paris.")
    assert out.choices[0].finish_reason == "stop"  # the EOS that ended it stays out of the content

    stream = await client.chat.completions.create(model=name, messages=ASK, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
    assert "".join(reasoning_of(d) or "" for d in deltas) == "France's capital: Paris."
    assert "".join(d.content or "" for d in deltas) == "Paris."

    messages = await _grpc_chat(mesh)
    assert ("".join(m.reasoning for m in messages), "".join(m.text for m in messages)) == (
        "France's capital: Paris.",
        "Paris.",
    )
    completion = await client.completions.create(model=name, prompt="Say hi")  # not a chat: as always
    assert completion.choices[0].text == "France's capital: Paris.Paris."


def test_the_reasoning_parsers_are_vllms_names() -> None:
    from services.gateway.config import GatewayConfig

    for name in ("deepseek_r1", "qwen3", "mistral"):
        assert GatewayConfig(reasoning_parser=name).reasoning_parser == name
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        GatewayConfig(reasoning_parser="gpt_oss")
