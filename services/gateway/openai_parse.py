"""OpenAI request bodies to GenerationSpecs: /v1/completions and /v1/chat/completions.

Supported: model, prompt / messages, max_tokens (max_completion_tokens), temperature, top_p, n,
stop, seed, stream, stream_options (include_usage, continuous_usage_stats), logprobs /
top_logprobs, presence_penalty, frequency_penalty, logit_bias, response_format (text,
json_object, json_schema), user; and the vLLM extensions top_k, min_p, repetition_penalty,
min_tokens, bad_words, allowed_token_ids, structured_outputs and guided_*, ignore_eos, stop_token_ids,
skip_special_tokens, include_stop_str_in_output, priority, cache_salt, request_id (the X-Request-Id
header wins over it), return_tokens_as_token_ids, echo (chat: the assistant's last message). Chat: tools, tool_choice (none, auto, required, a named
function) and parallel_tool_calls, tool messages in the history; vLLM's add_generation_prompt,
continue_final_message (the model continues the last message) and chat_template_kwargs. Known OpenAI fields that would
change the answer (functions, suffix...) are refused by name unless they hold their no-op value;
anything else unknown is refused by name too.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from scalellm.text.tool_calls import Tool, ToolCall, ToolChoice, ToolMode
from scalellm.types import InvalidParameter, StructuredOutput
from services.gateway.openai_convert import Body, kind_of, sampling_from_openai, structured_field, unsupported
from services.gateway.request import (
    CHAT_ROLES,
    ChatMessage,
    ChatRendering,
    GenerationSpec,
    Prompt,
    PromptKind,
    checked_request_id,
    invalid,
)

# ---- prompts and messages ------------------------------------------------------------------------


_PROMPT_SHAPES = "a string, an array of strings, an array of token ids or an array of arrays of token ids"


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_prompt(value: Any, param: str) -> Prompt:
    """A completions prompt: text, a batch of texts, token ids or a batch of token id lists."""
    if isinstance(value, str):
        return Prompt(PromptKind.TEXT, param, texts=(value,))
    if not isinstance(value, list) or not value:
        raise invalid(f"'{param}' must be {_PROMPT_SHAPES} (non-empty), got {kind_of(value)}", param)
    if all(isinstance(v, str) for v in value):
        return Prompt(PromptKind.TEXT, param, texts=tuple(value))
    if all(_is_token(v) for v in value):
        return Prompt(PromptKind.TOKENS, param, token_ids=(tuple(value),))
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return Prompt(PromptKind.TOKENS, param, token_ids=tuple(tuple(v) for v in value))
    raise invalid(f"'{param}' must be {_PROMPT_SHAPES}; token ids must be non-negative integers", param)


def _content(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            part_name = f"{name}[{j}]"
            if not isinstance(part, dict):
                raise invalid(f"'{part_name}' must be an object, got {kind_of(part)}", part_name)
            body = Body(part, part_name + ".")
            kind = body.string("type")
            if kind != "text":
                raise unsupported(f"{part_name}.type", f": only text parts are accepted, got {kind!r}")
            text = body.string("text")
            if text is None:
                raise invalid(f"'{part_name}.text' is required", f"{part_name}.text")
            body.finish()
            texts.append(text)
        return "\n".join(texts)
    raise invalid(f"'{name}' must be a string or an array of text parts, got {kind_of(value)}", name)


def _objects(value: list[Any], name: str) -> Iterator[tuple[str, Body]]:
    """Each element of a JSON array of objects as (its name, "messages[2]", and a Body)."""
    for i, raw in enumerate(value):
        item = f"{name}[{i}]"
        if not isinstance(raw, dict):
            raise invalid(f"'{item}' must be an object, got {kind_of(raw)}", item)
        yield item, Body(raw, item + ".")


def _tool_calls(value: Any, name: str) -> tuple[ToolCall, ...]:
    """An assistant message's earlier calls: [{id, type: function, function: {name, arguments}}]."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be an array of tool calls, got {kind_of(value)}", name)
    calls = []
    for call_name, call in _objects(value, name):
        call_id = call.string("id")
        if call.string("type", "function") != "function":
            raise invalid(f"'{call_name}.type' must be 'function'", f"{call_name}.type")
        function = _object(call.raw("function"), f"{call_name}.function")
        fn = Body(function, f"{call_name}.function.")
        fname, arguments = fn.string("name"), fn.string("arguments")
        if fname is None or arguments is None:
            raise invalid(
                f"'{call_name}.function' needs 'name' and 'arguments' (strings)", f"{call_name}.function"
            )
        fn.finish()
        call.finish()
        calls.append(ToolCall(fname, arguments, call_id) if call_id else ToolCall(fname, arguments))
    return tuple(calls)


def _reasoning(body: Body, name: str, role: str) -> str | None:
    """An assistant message's reasoning sent back in the history: reasoning_content (what a
    reasoning parser answers) or vLLM's newer name, reasoning."""
    given = [(key, body.string(key)) for key in ("reasoning_content", "reasoning")]
    texts = [(key, text) for key, text in given if text is not None]
    if texts and role != "assistant":
        raise invalid(f"'{name}.{texts[0][0]}' is only for assistant messages", f"{name}.{texts[0][0]}")
    if len({text for _, text in texts}) > 1:
        raise invalid(f"'{name}.reasoning_content' and '{name}.reasoning' differ", f"{name}.reasoning")
    return texts[0][1] if texts else None


def parse_messages(value: Any, param: str) -> tuple[ChatMessage, ...]:
    """Chat messages: a non-empty array of {role, content, name?} with text content; an assistant's
    may hold tool_calls (then content may be null), a tool's answers tool_call_id."""
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be an array of messages, got {kind_of(value)}", param)
    if not value:
        raise invalid(f"'{param}' must hold at least one message", param)
    out = []
    for name, body in _objects(value, param):
        role = body.string("role")
        if role is None:
            raise invalid(f"'{name}.role' is required", f"{name}.role")
        if role not in CHAT_ROLES:
            raise invalid(f"'{name}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"{name}.role")
        for key in ("function_call", "audio", "refusal"):
            body.reject(key, lambda v: v in ([], ""))
        calls = _tool_calls(body.raw("tool_calls"), f"{name}.tool_calls")
        if calls and role != "assistant":
            raise invalid(f"'{name}.tool_calls' is only for assistant messages", f"{name}.tool_calls")
        call_id = body.string("tool_call_id")
        if call_id is not None and role != "tool":
            raise invalid(f"'{name}.tool_call_id' is only for tool messages", f"{name}.tool_call_id")
        content = body.raw("content")
        if content is None and role != "assistant":
            raise invalid(f"'{name}.content' is required", f"{name}.content")
        text = "" if content is None else _content(content, f"{name}.content")
        speaker = body.string("name")
        reasoning = _reasoning(body, name, role)
        body.finish()
        out.append(
            ChatMessage("system" if role == "developer" else role, text, speaker, calls, call_id, reasoning)
        )
    return tuple(out)


# ---- tools ---------------------------------------------------------------------------------------


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def _chat_rendering(body: Body) -> ChatRendering:
    """add_generation_prompt, continue_final_message and chat_template_kwargs, as vLLM takes them."""
    kwargs = body.raw("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid(
            f"'chat_template_kwargs' must be an object, got {kind_of(kwargs)}",
            "chat_template_kwargs",
            "invalid_type",
        )
    return ChatRendering(
        add_generation_prompt=body.boolean("add_generation_prompt", True),
        continue_final_message=body.boolean("continue_final_message"),
        template_kwargs=kwargs or {},
    )


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"'{name}' must be an object, got {kind_of(value)}", name)
    return value


def _tool(raw: Any, name: str) -> Tool:
    body = Body(_object(raw, name), name + ".")
    if body.string("type") != "function":
        raise invalid(f"'{name}.type' must be 'function'", f"{name}.type")
    fn = Body(_object(body.raw("function"), f"{name}.function"), f"{name}.function.")
    fname = fn.string("name")
    if fname is None or not _FUNCTION_NAME.fullmatch(fname):
        raise invalid(
            f"'{name}.function.name' must be 1-64 of a-z, A-Z, 0-9, _ and -", f"{name}.function.name"
        )
    parameters = fn.raw("parameters")
    if parameters is not None:
        _object(parameters, f"{name}.function.parameters")
    strict = fn.boolean("strict") if fn.raw("strict") is not None else None
    tool = Tool(fname, fn.string("description"), parameters, strict)
    fn.finish()
    body.finish()
    return tool


def _tools(body: Body) -> tuple[Tool, ...]:
    raw = body.raw("tools")
    if raw is not None and not isinstance(raw, list):
        raise invalid(f"'tools' must be an array of tools, got {kind_of(raw)}", "tools")
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(raw or ()))
    if len({t.name for t in tools}) != len(tools):
        raise invalid("'tools' names a function twice", "tools")
    return tools


def parse_tools(body: Body) -> ToolChoice | None:
    """tools, tool_choice and parallel_tool_calls; None when no tools are offered."""
    tools, choice = _tools(body), body.raw("tool_choice")
    parallel = body.boolean("parallel_tool_calls", True)
    names = [t.name for t in tools]
    if not tools:
        if choice not in (None, "none"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if choice is None or choice in ("none", "auto", "required"):
        return ToolChoice(tools, ToolMode(choice or "auto"), parallel=parallel)
    if not isinstance(choice, dict):
        raise invalid(
            '\'tool_choice\' must be none, auto, required or {"type": "function", ...}', "tool_choice"
        )
    named = Body(choice, "tool_choice.")
    if named.string("type") != "function":
        raise invalid("'tool_choice.type' must be 'function'", "tool_choice.type")
    function = Body(_object(named.raw("function"), "tool_choice.function"), "tool_choice.function.")
    fname = function.string("name")
    if fname not in names:
        raise invalid(
            f"'tool_choice.function.name' {fname!r} is not one of the tools", "tool_choice.function.name"
        )
    function.finish()
    named.finish()
    return ToolChoice(tools, ToolMode.NAMED, fname, parallel)


# ---- request bodies ------------------------------------------------------------------------------


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_INT32 = (-(2**31), 2**31 - 1)


class Api(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A parsed OpenAI request: the spec plus how to shape the answer."""

    api: Api
    spec: GenerationSpec
    stream: bool = False
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the request's usage."""
    continuous_usage: bool = False
    """stream_options.continuous_usage_stats: every chunk carries its choice's usage so far."""
    logprobs: bool = False
    tools: ToolChoice | None = None
    """Chat: the tools offered and how the answer must use them."""
    echo: bool = False
    """Completions: the prompt's text (and with logprobs its logprobs) before each choice's.
    Chat (vLLM's): the last message's content before each answer's, when that message is the
    assistant's (an answer the model continues)."""
    echo_only: bool = False
    """echo with max_tokens 0: the generated token is dropped."""
    prompt_logprobs: bool = False
    """vLLM's prompt_logprobs: each choice carries "prompt_logprobs"."""
    tokens_as_ids: bool = False
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"."""

    @property
    def answer_id(self) -> str | None:
        """The id the client gave the request (None: the gateway's own id is the answer's)."""
        return self.spec.request_id


def _empty(v: Any) -> bool:
    return v in ([], {})


# Known OpenAI fields this server does not implement: name -> "its value changes nothing".
_VLLM_UNSUPPORTED = {
    "use_beam_search": lambda v: v is False,
    "length_penalty": lambda v: v == 1,
    "early_stopping": lambda v: v is False,
    "spaces_between_special_tokens": lambda v: v is True,
    "guided_whitespace_pattern": lambda v: False,
}
"""vLLM's fields for what this server does not do (beam search; the tokenizer's own spacing of
special tokens is the only one; JSON is always compact): refused unless they hold their default
(clients such as LangChain's vLLM classes send every one of them at its default)."""
_CHAT_UNSUPPORTED = {
    **_VLLM_UNSUPPORTED,
    "best_of": lambda v: v == 1,
    "functions": _empty,  # the deprecated form of tools
    "function_call": lambda v: v == "none",
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False,
}
_COMPLETION_UNSUPPORTED = {
    **_VLLM_UNSUPPORTED,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
}


def _informative(body: Body) -> None:
    """Chat fields that only label a request for the client's own records: type-checked, then
    ignored (nothing is stored for distillation, and there is one service tier)."""
    body.boolean("store")
    body.string("service_tier")
    metadata = body.raw("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise invalid("'metadata' must be an object of string values", "metadata")


def _stream_options(body: Body, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats)."""
    options = body.raw("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {kind_of(options)}", "stream_options")
    inner = Body(options, "stream_options.")
    include = inner.boolean("include_usage")
    continuous = inner.boolean("continuous_usage_stats")
    inner.finish()
    return include, continuous


def _common(
    body: Body,
    api: Api,
    prompt: Prompt,
    max_tokens: int | None,
    logprobs: int | None,
    names: dict[str, str] | None = None,
    prompt_logprobs: int | None = None,
) -> OpenAIRequest:
    model = body.string("model")
    priority = body.integer("priority", 0)
    if not _INT32[0] <= priority <= _INT32[1]:
        raise invalid(f"'priority' must be a 32-bit integer, got {priority}", "priority", "invalid_value")
    body.string("user")  # accepted: an end-user id for the operator's logs; it changes nothing
    stream = body.boolean("stream")
    include_usage, continuous_usage = _stream_options(body, stream)
    truncate = body.integer("truncate_prompt_tokens")
    if truncate is not None and truncate < 1 and truncate != -1:
        why = f"'truncate_prompt_tokens' must be -1 (the model's limit) or at least 1, got {truncate}"
        raise invalid(why, "truncate_prompt_tokens", "invalid_value")
    request_id = body.string("request_id")
    body.string("guided_decoding_backend")  # vLLM's older choice of grammar engine: there is one here
    tokens_as_ids = body.boolean("return_tokens_as_token_ids")
    spec = GenerationSpec(
        model=model,
        prompt=prompt,
        sampling=sampling_from_openai(body, max_tokens, logprobs, names, prompt_logprobs),
        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if api is Api.COMPLETIONS else None,
        priority=priority,
        truncate_prompt_tokens=truncate,
        request_id=None if request_id is None else checked_request_id(request_id, "request_id"),
        param_names=_param_names(body, names or {}),
    )
    body.finish()
    return OpenAIRequest(
        api, spec, stream, include_usage, continuous_usage, logprobs is not None, tokens_as_ids=tokens_as_ids
    )


def _param_names(body: Body, names: dict[str, str]) -> dict[str, str]:
    """The body's name of each SamplingParams field where it is another (GenerationSpec.param_names)."""
    given = structured_field(body)
    return {**names, "structured_output": given} if given is not None else dict(names)


def with_request_id(call: OpenAIRequest, header: str | None) -> OpenAIRequest:
    """The request with the X-Request-Id header's id, which wins over the body's (as in vLLM)."""
    if header is None:
        return call
    request_id = checked_request_id(header, "X-Request-Id")
    return replace(call, spec=replace(call.spec, request_id=request_id))


def parse_completion(data: dict[str, Any]) -> OpenAIRequest:
    """A /v1/completions body; GatewayError (400) naming the field on anything wrong."""
    body = Body(data)
    for name, noop in _COMPLETION_UNSUPPORTED.items():
        body.reject(name, noop)
    if not body.has("prompt"):
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = parse_prompt(body.raw("prompt"), "prompt")
    echo = body.boolean("echo")
    max_tokens, logprobs = body.integer("max_tokens"), body.integer("logprobs")
    asked = body.integer("prompt_logprobs")
    # echo with max_tokens 0 (how evaluation harnesses score a text): one token is generated and
    # dropped, as vLLM does; echo with logprobs reports the prompt's logprobs before the output's.
    echo_only = echo and max_tokens == 0
    prompt_logprobs = max(asked or 0, logprobs) if echo and logprobs is not None else asked
    names = {} if asked is not None else {"prompt_logprobs": "logprobs"}
    call = _common(
        body, Api.COMPLETIONS, prompt, 1 if echo_only else max_tokens, logprobs, names, prompt_logprobs
    )
    return replace(call, echo=echo, echo_only=echo_only, prompt_logprobs=asked is not None)


def parse_chat(data: dict[str, Any]) -> OpenAIRequest:
    """A /v1/chat/completions body; GatewayError (400) naming the field on anything wrong."""
    body = Body(data)
    for name, noop in _CHAT_UNSUPPORTED.items():
        body.reject(name, noop)
    _informative(body)
    if not body.has("messages"):
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    messages = parse_messages(body.raw("messages"), "messages")
    tools = parse_tools(body)
    max_tokens = body.integer("max_tokens")
    max_completion = body.integer("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid("give 'max_tokens' or 'max_completion_tokens', not two different values", "max_tokens")
    echo = body.boolean("echo")
    want_logprobs = body.boolean("logprobs")
    top = body.integer("top_logprobs")
    if top is not None and not want_logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    prompt = Prompt(
        PromptKind.CHAT,
        "messages",
        messages=messages,
        tools=tools.tools if tools else (),
        rendering=_chat_rendering(body),
    )
    names = {"logprobs": "top_logprobs"}
    if max_tokens is None and max_completion is not None:
        names["max_tokens"] = "max_completion_tokens"
    call = _common(
        body,
        Api.CHAT,
        prompt,
        max_tokens if max_tokens is not None else max_completion,
        (top or 0) if want_logprobs else None,
        names,
    )
    call = replace(call, echo=echo)
    return call if tools is None else _with_tools(call, tools)


def _with_tools(call: OpenAIRequest, tools: ToolChoice) -> OpenAIRequest:
    """The request with its tool choice; required / named ones constrain the output's grammar."""
    schema = tools.grammar_schema()
    if schema is None:
        return replace(call, tools=tools)
    sampling = call.spec.sampling
    if sampling.structured_output is not None:
        raise invalid(
            "'tool_choice' required or named cannot be combined with structured output "
            "(response_format, structured_outputs, guided_*)",
            "tool_choice",
        )
    try:
        sampling = replace(sampling, structured_output=StructuredOutput.json_schema(schema))
    except InvalidParameter as exc:
        raise invalid(exc.message_for("tool_choice"), "tool_choice", "invalid_value") from None
    names = {**call.spec.param_names, "structured_output": "tool_choice"}
    return replace(call, spec=replace(call.spec, sampling=sampling, param_names=names), tools=tools)


# ---- /tokenize and /detokenize (vLLM's shapes) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    model: str | None
    prompt: Prompt
    """A text, or a conversation (rendered through the chat template as generation would be)."""
    return_token_strs: bool = False


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    model: str | None
    tokens: tuple[int, ...]


def parse_tokenize(data: dict[str, Any]) -> TokenizeRequest:
    """{model, prompt} or {model, messages, tools?, add_generation_prompt?, continue_final_message?,
    chat_template_kwargs?}: the ids generation would send to the workers. add_special_tokens only
    at its default (what generation sends)."""
    body = Body(data)
    model = body.string("model")
    if body.has("messages") == body.has("prompt"):
        raise invalid("give exactly one of 'prompt' and 'messages'", "prompt", "missing_required_parameter")
    if body.has("messages"):
        messages = parse_messages(body.raw("messages"), "messages")
        prompt = Prompt(
            PromptKind.CHAT,
            "messages",
            messages=messages,
            tools=_tools(body),
            rendering=_chat_rendering(body),
        )
        body.reject("add_special_tokens", lambda v: v is False, ": the chat template writes them")
    else:
        text = body.string("prompt")
        if text is None:
            raise invalid("'prompt' must be a string", "prompt", "invalid_type")
        prompt = Prompt(PromptKind.TEXT, "prompt", texts=(text,))
        body.reject("add_special_tokens", lambda v: v is True, ": a prompt is always encoded with them")
    out = TokenizeRequest(model, prompt, body.boolean("return_token_strs"))
    body.finish()
    return out


def parse_detokenize(data: dict[str, Any]) -> DetokenizeRequest:
    body = Body(data)
    model = body.string("model")
    tokens = body.raw("tokens")
    if not isinstance(tokens, list) or not all(_is_token(t) for t in tokens):
        raise invalid("'tokens' must be an array of non-negative integers", "tokens", "invalid_type")
    body.finish()
    return DetokenizeRequest(model, tuple(tokens))
