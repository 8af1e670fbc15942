"""Tool calls: parsing the Hermes, Llama 3 and Mistral forms out of streamed text, the grammar schemas of
required / named choices, and the parsing of tools, tool_choice and tool messages in chat bodies."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from scalellm.text.tool_calls import (
    Tool,
    ToolCallStream,
    ToolChoice,
    ToolFormat,
    ToolMode,
    parse_whole,
    required_schema,
)
from scalellm.types import StructuredKind
from services.gateway.openai_parse import parse_chat
from services.gateway.request import GatewayError

WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool("get_time", None, {"type": "object", "properties": {"tz": {"type": "string"}}})
AUTO = ToolChoice((WEATHER, TIME), ToolMode.AUTO)


def stream_pieces(choice: ToolChoice, fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[Any]]:
    """Feed text piece by piece; the content seen and the calls as (name, arguments)."""
    stream = ToolCallStream(choice, fmt)
    content, calls = "", []
    for piece in pieces:
        delta = stream.feed(piece)
        content += delta.content
        calls += delta.calls
    end = stream.finish()
    content += end.content
    calls += end.calls
    assert calls == stream.calls
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def chars(text: str) -> list[str]:
    return list(text)


HERMES_TEXT = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
)


@pytest.mark.parametrize("split", [chars, lambda t: [t], lambda t: [t[:15], t[15:40], t[40:]]])
def test_hermes_calls_are_parsed_however_the_text_is_split(split: Any) -> None:
    content, calls = stream_pieces(AUTO, ToolFormat.HERMES, split(HERMES_TEXT))
    assert content == "Let me check."
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]


def test_hermes_plain_text_passes_through_and_a_lone_angle_bracket_is_released() -> None:
    stream = ToolCallStream(AUTO, ToolFormat.HERMES)
    assert stream.feed("a < b and <tool").content == "a < b and "  # "<tool" might open a call
    assert stream.feed("s>").content == "<tools>"
    assert stream.finish().content == "" and stream.calls == []


def test_hermes_array_body_unclosed_call_and_bad_json() -> None:
    # SmolLM2's form: a JSON array inside the tags; a call the model never closed still counts.
    body = '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert stream_pieces(AUTO, ToolFormat.HERMES, chars(body))[1] == [
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]
    # Not a call after all: the text comes back as content, tags included.
    content, calls = stream_pieces(AUTO, ToolFormat.HERMES, ["x <tool_call>not json</tool_call> y"])
    assert (content, calls) == ("x <tool_call>not json</tool_call> y", [])


def test_parallel_false_keeps_the_first_call() -> None:
    one = ToolChoice((WEATHER, TIME), ToolMode.AUTO, parallel=False)
    assert [c[0] for c in stream_pieces(one, ToolFormat.HERMES, [HERMES_TEXT])[1]] == ["get_weather"]


def test_llama3_json_form() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'
    assert stream_pieces(AUTO, ToolFormat.LLAMA3_JSON, chars(text)) == (
        "",
        [("get_weather", {"city": "Rome"}), ("get_time", {})],
    )
    assert stream_pieces(AUTO, ToolFormat.LLAMA3_JSON, chars("Hello {there}")) == ("Hello {there}", [])
    assert stream_pieces(AUTO, ToolFormat.LLAMA3_JSON, ["{not json"]) == ("{not json", [])


@pytest.mark.parametrize(
    "text", ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]',
             ' [ {"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]']
)  # fmt: skip
def test_mistral_form_with_or_without_its_tag(text: str) -> None:
    """[TOOL_CALLS] is a special token in Mistral's tokenizers: the text usually lacks it."""
    want = ("", [("get_weather", {"city": "Rome"}), ("get_time", {})])
    assert stream_pieces(AUTO, ToolFormat.MISTRAL, chars(text)) == want
    assert stream_pieces(AUTO, ToolFormat.MISTRAL, [text]) == want


def test_mistral_text_streams_and_its_call_ids_are_what_its_template_takes() -> None:
    stream = ToolCallStream(AUTO, ToolFormat.MISTRAL)
    assert stream.feed("[").content == ""  # the tag, an array of calls, or text: not yet clear
    assert stream.feed("1] First, ").content == "[1] First, "
    for text in ("[TOOL_CALL", "[ not a call"):
        assert stream_pieces(AUTO, ToolFormat.MISTRAL, chars(text)) == (text, [])
    _, [call] = parse_whole(AUTO, ToolFormat.MISTRAL, '[{"name": "get_time", "arguments": {}}]')
    assert len(call.id) == 9 and call.id.isalnum()  # Mistral's templates refuse any other id
    _, [named] = parse_whole(ToolChoice((TIME,), ToolMode.NAMED, "get_time"), ToolFormat.MISTRAL, "{}")
    assert len(named.id) == 9 and named.id.isalnum()
    _, [hermes] = parse_whole(
        AUTO, ToolFormat.HERMES, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert hermes.id.startswith("call_")


def test_mistral_v11_content_then_calls_however_the_text_is_split() -> None:
    text = (
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}'
    )
    want = ("Checking.", [("get_weather", {"city": "Rome"}), ("get_time", {})])
    assert stream_pieces(AUTO, ToolFormat.MISTRAL_V11, chars(text)) == want
    assert stream_pieces(AUTO, ToolFormat.MISTRAL_V11, [text]) == want
    stream = ToolCallStream(AUTO, ToolFormat.MISTRAL_V11)
    assert stream.feed("Hi [TOOL").content == "Hi "  # the tag may be starting: held
    assert stream.feed("S] no").content == "[TOOLS] no"
    for bad in (
        "[TOOL_CALLS]get_weather{}",
        '[TOOL_CALLS][ARGS]{"a": 1}',
        "[TOOL_CALLS]f[ARGS]{oops",
        "no calls",
    ):
        assert stream_pieces(AUTO, ToolFormat.MISTRAL_V11, chars(bad)) == (bad, []), bad
    _, [call] = parse_whole(AUTO, ToolFormat.MISTRAL_V11, "[TOOL_CALLS]get_time[ARGS]{}")
    assert len(call.id) == 9 and call.id.isalnum()
    assert ToolFormat.for_template("{{ '[TOOL_CALLS]' + c.name + '[ARGS]' }}") is ToolFormat.MISTRAL_V11
    assert ToolFormat.MISTRAL_V11.needs_special_tokens and not ToolFormat.MISTRAL.needs_special_tokens


def test_a_historys_call_ids_become_ids_mistral_templates_take() -> None:
    """Clients bring their own ids ("call_..." from OpenAI, other servers): for Mistral each becomes
    9 letters and digits, the same for the call and its answer and from one request to the next
    (the conversation stays a cached prefix); ids already in that form are kept."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7f3a_x", "type": "function", "function": {"name": "get_weather", "arguments": {}}},
            {"id": "Ab3dE6gH9", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "tool_call_id": "call_7f3a_x", "content": "sunny"},
        {"role": "tool", "tool_call_id": "Ab3dE6gH9", "content": "noon"},
    ]  # fmt: skip
    mapped = ToolFormat.MISTRAL.template_messages(history)
    first, kept = (c["id"] for c in mapped[1]["tool_calls"])
    assert len(first) == 9 and first.isascii() and first.isalnum() and kept == "Ab3dE6gH9"
    assert [m.get("tool_call_id") for m in mapped[2:]] == [first, kept]
    assert ToolFormat.MISTRAL.template_messages(history) == mapped  # the same in every request
    other = ToolFormat.MISTRAL.template_messages(
        [{"role": "tool", "tool_call_id": "call_7f3a_y", "content": ""}]
    )
    assert other[0]["tool_call_id"] != first
    assert history[1]["tool_calls"][0]["id"] == "call_7f3a_x"  # the caller's messages are not changed
    assert ToolFormat.HERMES.template_messages(history) is history


def test_format_is_chosen_from_the_template() -> None:
    assert ToolFormat.for_template("{{ '<tool_call>' }}") is ToolFormat.HERMES
    assert ToolFormat.for_template("{{ '[TOOL_CALLS]' + tool_calls|tojson }}") is ToolFormat.MISTRAL
    assert (
        ToolFormat.for_template("{% if message.role == 'ipython' %}<|python_tag|>") is ToolFormat.LLAMA3_JSON
    )
    assert ToolFormat.for_template(None) is ToolFormat.HERMES


def test_required_and_named_schemas_accept_exactly_the_calls() -> None:
    schema = required_schema((WEATHER, TIME))
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            [{"name": "get_time", "parameters": {}}] * 2, required_schema((TIME,), parallel=False)
        )
    required = ToolChoice((WEATHER, TIME), ToolMode.REQUIRED)
    content, calls = parse_whole(
        required, ToolFormat.HERMES, '[{"name": "get_time", "parameters": {"tz": "UTC"}}]'
    )
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_time", '{"tz": "UTC"}')]
    named = ToolChoice((WEATHER,), ToolMode.NAMED, "get_weather")
    assert named.grammar_schema() == WEATHER.parameters
    assert [(c.name, c.arguments) for c in parse_whole(named, ToolFormat.HERMES, '{"city": "X"}')[1]] == [
        ("get_weather", '{"city": "X"}')
    ]


# ---- chat bodies ---------------------------------------------------------------------------------

M = [{"role": "user", "content": "weather?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER.parameters}}]


def test_chat_tools_parse_into_the_prompt_and_the_grammar() -> None:
    auto = parse_chat({"messages": M, "tools": TOOLS})
    assert auto.tools is not None and auto.tools.mode is ToolMode.AUTO
    assert auto.spec.prompt.tools[0].to_openai() == TOOLS[0]
    assert auto.spec.sampling.structured_output is None
    required = parse_chat({"messages": M, "tools": TOOLS, "tool_choice": "required"})
    so = required.spec.sampling.structured_output
    assert so is not None and so.kind is StructuredKind.JSON_SCHEMA
    assert json.loads(so.spec) == required_schema(required.spec.prompt.tools)
    named = parse_chat(
        {
            "messages": M,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    assert named.tools is not None and named.tools.function == "get_weather"
    assert json.loads(named.spec.sampling.structured_output.spec) == WEATHER.parameters  # type: ignore[union-attr]
    none = parse_chat({"messages": M, "tools": TOOLS, "tool_choice": "none"})
    assert none.tools is not None and none.tools.mode is ToolMode.NONE and none.spec.prompt.tools


def test_nulls_count_as_absent_in_tools() -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "description": None, "strict": None, "parameters": None},
        }
    ]
    [tool] = parse_chat({"messages": M, "tools": tools}).spec.prompt.tools
    assert tool.to_openai() == {"type": "function", "function": {"name": "f"}}
    strict = [{"type": "function", "function": {"name": "f", "strict": True}}]
    assert parse_chat({"messages": M, "tools": strict}).spec.prompt.tools[0].strict is True


def test_tool_messages_in_the_history_are_accepted() -> None:
    history = [
        *M,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    messages = parse_chat({"messages": history, "tools": TOOLS}).spec.prompt.messages
    assert messages[1].to_template()["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert messages[2].to_template() == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


BAD_TOOLS: list[tuple[dict[str, Any], str]] = [
    ({"tools": "f"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, "tools[0].function.x"),
    ({"tools": TOOLS * 2}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        },
        "messages[0].tool_calls",
    ),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool"}]}, "messages[0].content"),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
        "messages[0].tool_calls[0].function",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD_TOOLS)
def test_bad_tools_are_400_naming_the_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_chat({"messages": M, **extra})
    assert info.value.kind.http_status == 400 and info.value.param == param, info.value
