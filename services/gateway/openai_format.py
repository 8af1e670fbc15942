"""Gateway results in OpenAI's response shapes: streaming chunks and whole responses, and the
server-sent events that carry them (``data: <json>\\n\\n`` per chunk, ``data: [DONE]`` last).

One OpenAIFormatter per request keeps the per-choice state (chat role sent, text offsets, and for
non-streaming answers the accumulated text). Timings go on each choice's final chunk (or on the
choice of a whole response) as ``"timings"`` when the client opted in. JSON is encoded once per
chunk, compactly, with non-ASCII text kept as UTF-8.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from json.encoder import encode_basestring
from typing import Any

from scalellm.text.reasoning import ReasoningStream
from scalellm.text.tool_calls import ToolCallStream, ToolDelta, ToolMode, parse_whole
from scalellm.types import FinishReason, TokenLogprobs, Usage
from services.gateway.admission import ServedModel
from services.gateway.openai_convert import (
    TokenIdNames,
    TokenNames,
    chat_logprobs_to_openai,
    completion_logprobs_to_openai,
    echo_logprobs_to_openai,
    finish_reason_to_openai,
    prompt_logprobs_to_openai,
    timings_to_openai,
    usage_to_openai,
)
from services.gateway.openai_parse import Api, OpenAIRequest
from services.gateway.request import ChoiceUpdate, GenerationRequest


class _Choice:
    __slots__ = (
        "finish",
        "logprobs",
        "offset",
        "prompt_logprobs",
        "reasoning",
        "started",
        "texts",
        "timings",
        "tokens",
        "tools",
        "usage",
    )

    def __init__(self, tools: ToolCallStream | None = None, reasoning: ReasoningStream | None = None) -> None:
        self.tools = tools  # chat with tools: splits the text into content and tool calls
        self.reasoning = reasoning  # with a reasoning parser: the <think> block first
        self.started = False
        self.tokens = 0  # tokens generated so far (counted by chunk(): for continuous usage stats)
        self.offset = 0
        self.texts: list[str] = []
        self.logprobs: list[Any] = []
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.timings: dict[str, Any] | None = None
        self.prompt_logprobs: list[Any] | None = None  # vLLM's, when asked for


class OpenAIFormatter:
    """Builds the JSON objects of one request's answer."""

    def __init__(
        self, call: OpenAIRequest, request: GenerationRequest, model: ServedModel, timings: bool = False
    ) -> None:
        self.call = call
        self.request = request
        self.model = model
        self.timings = timings
        chat = call.api is Api.CHAT
        self.request_id = call.answer_id or request.request_id
        """The client's id for the request when it gave one (the X-Request-Id answered), else the
        gateway's."""
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{self.request_id}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self._names: TokenNames = TokenIdNames() if call.tokens_as_ids else model
        self._echo = _chat_echo(call) if chat else ""
        tools = call.tools if call.tools is not None and call.tools.mode is not ToolMode.NONE else None
        self._tools = tools
        self._tool_format = model.tool_format() if tools else None
        self._choices = [
            _Choice(
                ToolCallStream(tools, self._tool_format) if tools and self._tool_format else None,
                model.reasoning_stream(request.prompt_of(index)) if chat else None,
            )
            for index in range(request.num_choices)
        ]
        self._text_events: dict[int, tuple[bytes, bytes] | None] = {}

    def _envelope(
        self, choices: list[dict[str, Any]], obj: str | None = None, index: int | None = None
    ) -> dict[str, Any]:
        """A chunk or response around ``choices``; a streamed chunk of choice ``index`` carries its
        usage so far when the client asked for continuous usage stats."""
        out = {
            "id": self.id,
            "object": obj or self.object,
            "created": self.created,
            "model": self.request.model,
        }
        out["choices"] = choices
        if index is not None and self.call.continuous_usage:
            state = self._choices[index]
            done = state.usage.completion_tokens if state.usage is not None else state.tokens
            out["usage"] = usage_to_openai(Usage(len(self.request.prompt_of(index)), done), details=False)
        elif self.call.include_usage:
            out["usage"] = None
        return out

    # -- streaming ---------------------------------------------------------------------------------

    def chunk(self, update: ChoiceUpdate) -> dict[str, Any] | None:
        """The chunk for one update, or None when it carries nothing a client would see."""
        state = self._choices[update.index]
        if self.call.api is Api.CHAT:
            state.tokens += len(update.token_ids)
            logprobs = (
                self._logprobs(state, update.logprobs) if self.call.logprobs and update.logprobs else None
            )
            delta = self._delta(state, update)
            if len(delta) == 0 and logprobs is None and update.finish is None:
                return None
            choice: dict[str, Any] = {"index": update.index, "delta": delta}
        else:
            first = not state.started
            text, logprobs = self._completion_parts(update.index, state, update)
            if not text and logprobs is None and update.finish is None and not first:
                return None
            choice = {"index": update.index, "text": text}
            if first and state.prompt_logprobs is not None:
                choice["prompt_logprobs"] = state.prompt_logprobs
        state.started = True
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self._finish_reason(state, update.finish)
        if update.finish is not None:
            self._finish(state, update)
            if self.timings and state.timings is not None:
                choice["timings"] = state.timings
        return self._envelope([choice], index=update.index)

    def _delta(self, state: _Choice, update: ChoiceUpdate) -> dict[str, Any]:
        """A chat chunk's delta: the role first, then reasoning (with a reasoning parser), content
        (the first one after an echoed message) and (with tools) tool calls."""
        delta = self._answer_delta(state, update)
        if not state.started and self._echo:
            delta["content"] = self._echo + delta["content"]
        return delta

    def _answer_delta(self, state: _Choice, update: ChoiceUpdate) -> dict[str, Any]:
        delta: dict[str, Any] = {} if state.started else {"role": "assistant"}
        text = update.text
        if state.reasoning is not None:
            split = state.reasoning.feed(text, final=update.finish is not None)
            if split.reasoning:
                delta["reasoning_content"] = delta["reasoning"] = split.reasoning
            text = split.content
        if state.tools is None:
            if text or not state.started:
                delta["content"] = text
            return delta
        part = state.tools.feed(text)
        if update.finish is not None:
            end = state.tools.finish()
            part = ToolDelta(part.content + end.content, part.calls + end.calls, part.arguments)
        if part.content or not state.started:
            delta["content"] = part.content
        calls = [{"index": state.tools.calls.index(call), **call.to_openai()} for call in part.calls]
        if part.arguments and calls:
            calls[0]["function"]["arguments"] += part.arguments
        elif part.arguments:
            calls.append({"index": 0, "function": {"arguments": part.arguments}})
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _finish_reason(self, state: _Choice, reason: FinishReason | None) -> str | None:
        """OpenAI's reason; "tool_calls" for a choice that ended by itself after calling tools."""
        if reason is FinishReason.STOP and state.tools is not None and state.tools.calls:
            return "tool_calls"
        if reason is not None and self.call.echo_only:
            return "length"  # max_tokens 0: the generated token was dropped
        return finish_reason_to_openai(reason)

    def event(self, update: ChoiceUpdate) -> bytes | None:
        """The SSE event of chunk(update), or None when there is none.

        A text delta in mid-stream (the common case) skips the JSON encoder: the chunk is the
        choice's pre-encoded envelope around the encoded text, byte for byte what chunk() gives
        (not with continuous usage stats: there every chunk differs in its usage).
        """
        state = self._choices[update.index]
        plain = not (
            (self.call.logprobs and update.logprobs)
            or self.call.continuous_usage
            or state.tools
            or state.reasoning
            or self.call.echo_only
        )
        if state.started and update.finish is None and plain:
            if not update.text:
                return None
            around = self._text_event(update.index)
            if around is not None:
                return around[0] + encode_basestring(update.text).encode("utf-8") + around[1]
        chunk = self.chunk(update)
        return None if chunk is None else sse_event(chunk)

    def _text_event(self, index: int) -> tuple[bytes, bytes] | None:
        """The bytes before and after the text in a mid-stream text-only event of choice index."""
        if index not in self._text_events:
            marker = "\x00scalellm-text\x00"
            choice: dict[str, Any] = {"index": index}
            if self.call.api is Api.CHAT:
                choice["delta"] = {"content": marker}
            else:
                choice["text"] = marker
            choice["logprobs"] = None
            choice["finish_reason"] = None
            encoded, quoted = sse_event(self._envelope([choice])), encode_basestring(marker).encode()
            before, _, after = encoded.partition(quoted)
            self._text_events[index] = (before, after) if encoded.count(quoted) == 1 else None
        return self._text_events[index]

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        out = self._envelope([])
        out["usage"] = self.usage()
        return out

    # -- whole responses ---------------------------------------------------------------------------

    def add(self, update: ChoiceUpdate) -> None:
        """Accumulate one update of a non-streaming answer."""
        state = self._choices[update.index]
        if self.call.api is Api.CHAT:
            state.texts.append(update.text)
            if self.call.logprobs and update.logprobs:
                self._logprobs(state, update.logprobs)
        else:
            state.texts.append(self._completion_parts(update.index, state, update)[0])
            state.started = True
        if update.finish is not None:
            self._finish(state, update)

    def response(self) -> dict[str, Any]:
        """The whole answer once every choice finished."""
        choices = []
        for index, state in enumerate(self._choices):
            text = "".join(state.texts)
            choice: dict[str, Any] = {"index": index}
            if self.call.api is Api.CHAT:
                choice["message"] = self._message(state, text)
                choice["logprobs"] = {"content": state.logprobs} if self.call.logprobs else None
            else:
                choice["text"] = text
                choice["logprobs"] = (
                    _merge_completion_logprobs(state.logprobs) if self.call.logprobs else None
                )
                if state.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = state.prompt_logprobs
            choice["finish_reason"] = state.finish
            if self.timings and state.timings is not None:
                choice["timings"] = state.timings
            choices.append(choice)
        obj = "chat.completion" if self.call.api is Api.CHAT else "text_completion"
        out = self._envelope(choices, obj)
        out["usage"] = self.usage()
        return out

    def usage(self) -> dict[str, Any]:
        """Usage in OpenAI's shape: each prompt counted once, completions summed over choices."""
        n = self.request.sampling.n
        completion = sum(s.usage.completion_tokens for s in self._choices if s.usage)
        cached = sum(
            s.usage.cached_prompt_tokens for i, s in enumerate(self._choices) if s.usage and i % n == 0
        )
        return usage_to_openai(Usage(self.request.prompt_tokens, completion, cached))

    def _completion_parts(self, index: int, state: _Choice, update: ChoiceUpdate) -> tuple[str, Any]:
        """A completion update's text and logprobs block: echo puts the prompt's text (and
        logprobs) before the choice's first output; echo_only drops the output."""
        call = self.call
        text, block = ("", None) if call.echo_only else (update.text, None)
        if not call.echo_only:
            state.tokens += len(update.token_ids)
        if state.started or not (call.echo or call.prompt_logprobs):
            if call.logprobs and update.logprobs and not call.echo_only:
                block = self._logprobs(state, update.logprobs)
            return text, block
        if call.prompt_logprobs:
            state.prompt_logprobs = prompt_logprobs_to_openai(update.prompt_logprobs, self.model)
        if not call.echo:
            return text, self._logprobs(state, update.logprobs) if call.logprobs and update.logprobs else None
        prompt = self.request.prompt_of(index)
        spec = call.spec.prompt
        echoed = (
            spec.texts[index // self.request.sampling.n]
            if spec.texts
            else self.model.tokenizer.decode(prompt, skip_special_tokens=False)
        )
        if call.logprobs:
            block = echo_logprobs_to_openai(prompt, update.prompt_logprobs, self._names)
            state.logprobs.append(block)
            state.offset = len(echoed)
            if update.logprobs and not call.echo_only:
                block = _merge_completion_logprobs([block, self._logprobs(state, update.logprobs)])
        return echoed + text, block

    def _message(self, state: _Choice, text: str) -> dict[str, Any]:
        """A whole chat answer; with a reasoning parser, its reasoning as ``reasoning_content``
        and ``reasoning`` (content null when there is none after it); with tools, its calls as
        ``tool_calls`` (content null without text)."""
        message = self._answer_message(state, text)
        if self._echo:
            message["content"] = self._echo + (message["content"] or "")
        return message

    def _answer_message(self, state: _Choice, text: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"}
        no_text: str | None = ""
        if state.reasoning is not None:
            split = state.reasoning.feed(text, final=True)
            # Both names: vLLM writes only `reasoning` now; SGLang, DeepSeek's API and most
            # clients read `reasoning_content` (vLLM sent both while it moved).
            message["reasoning_content"] = message["reasoning"] = split.reasoning or None
            text, no_text = split.content, None  # nothing after the reasoning: null
        if self._tools is None or self._tool_format is None:
            return {**message, "content": text or no_text}
        content, calls = parse_whole(self._tools, self._tool_format, text)
        if not calls:
            return {**message, "content": content or no_text}
        if state.finish == "stop":
            state.finish = "tool_calls"
        return {**message, "content": content or None, "tool_calls": [c.to_openai() for c in calls]}

    # -- helpers -----------------------------------------------------------------------------------

    def _finish(self, state: _Choice, update: ChoiceUpdate) -> None:
        state.finish = self._finish_reason(state, update.finish)
        state.usage = update.usage
        if self.call.echo_only and update.usage is not None:
            state.usage = replace(update.usage, completion_tokens=0)
        state.timings = timings_to_openai(update.timings) if update.timings else None

    def _logprobs(self, state: _Choice, entries: Sequence[TokenLogprobs]) -> Any:
        if self.call.api is Api.CHAT:
            content = chat_logprobs_to_openai(entries, self._names)
            state.logprobs.extend(content)
            return {"content": content}
        block, state.offset = completion_logprobs_to_openai(entries, self._names, state.offset)
        state.logprobs.append(block)
        return block


def _chat_echo(call: OpenAIRequest) -> str:
    """What a chat answer starts with under vLLM's echo: the last message's content when it is
    the assistant's (the answer the model continues), else nothing."""
    messages = call.spec.prompt.messages
    if not call.echo or not messages or messages[-1].role != "assistant":
        return ""
    return messages[-1].content


def _merge_completion_logprobs(blocks: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for block in blocks:
        for key, values in block.items():
            merged[key].extend(values)
    return merged


# ---- server-sent events --------------------------------------------------------------------------


SSE_DONE = b"data: [DONE]\n\n"
SSE_CONTENT_TYPE = "text/event-stream"

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (also for non-streaming bodies)."""
    return _encode(obj).encode("utf-8")


def sse_event(obj: Any) -> bytes:
    """One SSE event carrying obj as JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


def parse_events(raw: bytes) -> list[Any]:
    """Decode a whole SSE body back into its objects ("[DONE]" stays a string); for tests and tools."""
    out: list[Any] = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
