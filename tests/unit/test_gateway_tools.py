"""Tool calling through the in-process gateway in front of a scripted decode worker (fixtures:
test_gateway_server.py): the worker's reply is a tool call in the model's format, and the official
openai client must read it back as ``tool_calls``, whole and streamed; required / named choices
reach the worker as a JSON-schema grammar; the chat template is given the tools and the history's
tool messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from scalellm.text.tool_calls import ToolCall, required_schema
from scalellm.types.proto import sampling_from_proto
from services.gateway.admission import Preprocessor, ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.openai_parse import parse_chat
from tests.unit.test_gateway_server import (
    MeshFactory,
    replying,
)

MODEL = "SmolLM2-135M-Instruct"
M = [{"role": "user", "content": "Weather in Paris?"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": PARAMS}}
]
HERMES = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def test_auto_tool_call_whole_and_streamed(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, HERMES)
    client = mesh.client()
    out = await client.chat.completions.create(model=MODEL, messages=M, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert mesh.workers[0].requests[0].sampling.HasField("structured_output") is False  # auto: free text

    stream = await client.chat.completions.create(model=MODEL, messages=M, tools=TOOLS, stream=True)
    chunks = [c async for c in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert content == "Checking." and "<tool_call>" not in content
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [  # type: ignore[union-attr]
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_plain_answer_with_tools_offered_stays_content(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, "It is sunny.")
    out = await mesh.client().chat.completions.create(model=MODEL, messages=M, tools=TOOLS)
    assert out.choices[0].message.content == "It is sunny." and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"


async def test_required_sends_the_grammar_and_parses_the_array(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    out = await mesh.client().chat.completions.create(
        model=MODEL, messages=M, tools=TOOLS, tool_choice="required"
    )
    [call] = out.choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert out.choices[0].message.content is None and out.choices[0].finish_reason == "tool_calls"
    so = sampling_from_proto(mesh.workers[0].requests[0].sampling).structured_output
    assert so is not None and json.loads(so.spec) == required_schema(
        parse_chat({"messages": M, "tools": TOOLS}).spec.prompt.tools
    )


async def test_named_function_streams_its_arguments(mesh_factory: MeshFactory) -> None:
    mesh = await replying(mesh_factory, '{"city": "Rome"}')
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    stream = await mesh.client().chat.completions.create(
        model=MODEL, messages=M, tools=TOOLS, tool_choice=named, stream=True
    )
    chunks = [c async for c in stream]
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2  # the arguments arrive piece by piece
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function)) == {"city": "Rome"}
    assert {d.index for d in deltas} == {0} and chunks[-1].choices[0].finish_reason == "tool_calls"
    so = sampling_from_proto(mesh.workers[0].requests[0].sampling).structured_output
    assert so is not None and json.loads(so.spec) == PARAMS


TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tool_model(demo_model_dir: Path, tmp_path: Path) -> Path:
    """The demo tokenizer with a chat template that shows tools and tool messages."""
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json"):
        if (demo_model_dir / name).exists():
            shutil.copy(demo_model_dir / name, tmp_path / name)
    config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


async def test_the_template_sees_tools_and_tool_messages(tool_model: Path) -> None:
    config = GatewayConfig(model=str(tool_model))
    model = ServedModel(tool_model, config)
    call = ToolCall("get_weather", '{"city": "Paris"}', "call_7")
    history = [
        *M,
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]
    spec = parse_chat({"messages": history, "tools": TOOLS}).spec
    [ids] = await Preprocessor(model, config).tokenize(spec.prompt)
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<tools>" + json.dumps(TOOLS[0]) + "</tools>\n")
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text  # arguments as an object
    assert "<|im_start|>tool\nsunny [call_7]<|im_end|>" in text


# Mistral's templates check every id in the history (this one as theirs do, in its own words).
MISTRAL_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.tool_calls %}[TOOL_CALLS]{% for c in m.tool_calls %}"
    "{% if not (c.id is string and c.id | length == 9) %}{{ raise_exception('call ids must be 9 characters') }}{% endif %}"
    "{{ c.function.name }}:{{ c.id }} {% endfor %}"
    "{% elif m.tool_call_id %}[TOOL_RESULTS]{{ m.tool_call_id }}:{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
)


async def test_a_mistral_template_takes_a_history_with_openai_call_ids(tool_model: Path) -> None:
    config_path = tool_model / "tokenizer_config.json"
    config_json = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config_json | {"chat_template": MISTRAL_TEMPLATE}))
    config = GatewayConfig(model=str(tool_model))
    model = ServedModel(tool_model, config)
    call = ToolCall("get_weather", '{"city": "Paris"}', "call_9b1c2e7d4f")  # an id from OpenAI's form
    history = [
        *M,
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    spec = parse_chat({"messages": history, "tools": TOOLS}).spec
    [ids] = await Preprocessor(model, config).tokenize(spec.prompt)
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    mapped = text.split("get_weather:")[1].split(" ")[0]
    assert len(mapped) == 9 and mapped.isalnum()
    assert f"[TOOL_RESULTS]{mapped}:sunny[/TOOL_RESULTS]" in text


# Mistral Small 3.1+ write [TOOL_CALLS]name[ARGS]{...} per call, the tags special tokens.
MISTRAL_V11_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]"
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% else %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
)


@pytest.fixture
def mistral_v11_model(tool_model: Path) -> Path:
    """The demo tokenizer with [TOOL_CALLS] and [ARGS] as special tokens and a template writing them."""
    tok = tokenizers.Tokenizer.from_file(str(tool_model / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("[TOOL_CALLS]", "[ARGS]")])
    tok.save(str(tool_model / "tokenizer.json"))
    config_path = tool_model / "tokenizer_config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"chat_template": MISTRAL_V11_TEMPLATE})
    )
    return tool_model


async def test_mistral_v11_calls_are_read_from_their_special_tokens(
    mesh_factory: MeshFactory, mistral_v11_model: Path
) -> None:
    """The tags are special tokens, which the answer's text drops by default: for this format the
    gateway keeps them (skip_special_tokens false) and reads the calls out, whole and streamed."""
    reply = 'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
    mesh = await replying(mesh_factory, reply, model_dir=mistral_v11_model)
    tok = mesh.gateway.core.model.tokenizer
    assert len(tok.encode("[TOOL_CALLS][ARGS]", add_special_tokens=False)) == 2  # two special tokens
    client, name = mesh.client(), mesh.gateway.core.model.name
    out = await client.chat.completions.create(model=name, messages=M, tools=TOOLS)
    choice = out.choices[0]
    assert choice.message.content == "Let me check." and choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]  # type: ignore[union-attr]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)

    stream = await client.chat.completions.create(model=name, messages=M, tools=TOOLS, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_weather")]  # type: ignore[union-attr]

    plain = await client.chat.completions.create(model=name, messages=M)  # no tools: tags dropped as usual
    assert plain.choices[0].message.content == tok.decode(tok.encode(reply, add_special_tokens=False))
