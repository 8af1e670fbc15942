"""OpenAI's Responses API (POST /v1/responses) over the chat completions path.

A Responses request is rewritten as a chat completions body (``chat_body``) and goes through
parse_chat, so validation, sampling, tools, structured output and the reasoning parser are the
chat route's own. Its answer is read back from the chat formatter's chunks (``ResponseBuilder``):
reasoning, text and tool calls become output items, and a stream gets the Responses events.

    input / instructions        -> messages (input_text / output_text parts, function_call and
                                   function_call_output items, earlier reasoning items dropped)
    max_output_tokens           -> max_tokens          text.format -> response_format
    tools [{type, name, ...}]   -> tools [{type, function: {name, ...}}]

    chat delta reasoning_content -> a "reasoning" item        (response.reasoning_text.delta)
    chat delta content           -> a "message" item          (response.output_text.delta)
    chat delta tool_calls        -> one "function_call" item each

Nothing is stored: previous_response_id and background are refused, store is accepted and
changes nothing (as OpenAI's store: false).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any
from uuid import uuid4

from services.gateway.openai_convert import Body, kind_of, unsupported
from services.gateway.request import GatewayError, invalid

# Fields passed to the chat route as they are (OpenAI's, and vLLM's sampling extensions).
PASSED_AS_IS = (
    "model", "temperature", "top_p", "stream", "tool_choice", "parallel_tool_calls", "user",
    "seed", "stop", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "priority", "chat_template_kwargs",
)  # fmt: skip
_RENAMED = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def chat_body(data: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body a Responses request means; GatewayError naming its field."""
    body = Body(data)
    for name, noop in (
        ("previous_response_id", lambda v: False),
        ("background", lambda v: v is False),
        ("include", lambda v: v == []),
        ("truncation", lambda v: v == "disabled"),
        ("reasoning", lambda v: v == {}),
        ("top_logprobs", lambda v: v == 0),
        ("prompt", lambda v: False),
    ):
        body.reject(name, noop)
    body.boolean("store")  # nothing is kept either way
    body.string("service_tier")
    metadata = body.raw("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("'metadata' must be an object", "metadata")
    chat: dict[str, Any] = {key: value for key in PASSED_AS_IS if (value := body.raw(key)) is not None}
    chat["messages"] = _messages(body.raw("input"), body.string("instructions"))
    if (max_tokens := body.raw("max_output_tokens")) is not None:
        chat["max_tokens"] = max_tokens
    if (tools := body.raw("tools")) is not None:
        chat["tools"] = [_tool(raw, f"tools[{i}]") for i, raw in enumerate(_array(tools, "tools"))]
    if isinstance(chat.get("tool_choice"), dict):  # {"type": "function", "name": ...}
        chat["tool_choice"] = {"type": "function", "function": {"name": chat["tool_choice"].get("name")}}
    if (text := body.raw("text")) is not None:
        chat["response_format"] = _format(text)
    body.finish()
    return chat


def renamed(exc: GatewayError) -> GatewayError:
    """A chat route's error in the Responses request's names."""
    message, param = exc.message, exc.param
    for chat_name, name in _RENAMED.items():
        message = message.replace(f"'{chat_name}", f"'{name}")
        if param is not None and param.startswith(chat_name):
            param = name + param[len(chat_name) :]
    return GatewayError(exc.kind, message, param=param, code=exc.code, retry_after=exc.retry_after)


def _array(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be an array, got {kind_of(value)}", name)
    return value


def _object(value: Any, name: str) -> Body:
    if not isinstance(value, dict):
        raise invalid(f"'{name}' must be an object, got {kind_of(value)}", name)
    return Body(value, name + ".")


def _text(content: Any, name: str) -> str:
    """A message's text: a string, or text parts (input_text, output_text) joined."""
    if isinstance(content, str):
        return content
    texts = []
    for j, raw in enumerate(_array(content, name)):
        part = _object(raw, f"{name}[{j}]")
        kind = part.string("type")
        if kind not in ("input_text", "output_text", "text"):
            raise unsupported(f"{name}[{j}].type", f": only text parts are accepted, got {kind!r}")
        text = part.string("text")
        if text is None:
            raise invalid(f"'{name}[{j}].text' is required", f"{name}[{j}].text")
        part.raw("annotations")
        part.raw("logprobs")
        part.finish()
        texts.append(text)
    return "\n".join(texts)


def _messages(value: Any, instructions: str | None) -> list[dict[str, Any]]:
    """input (a string or items) after the instructions, as chat messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    if value is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    if not _array(value, "input"):
        raise invalid("'input' must hold at least one item", "input")
    for i, raw in enumerate(value):
        name = f"input[{i}]"
        item = _object(raw, name)
        kind = item.string("type", "message")
        item.string("id")
        item.string("status")
        if kind == "message":
            role = item.string("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"'{name}.role' must be user, assistant, system or developer", f"{name}.role")
            messages.append({"role": role, "content": _text(item.raw("content"), f"{name}.content")})
        elif kind == "function_call":
            call_id, fname, arguments = item.string("call_id"), item.string("name"), item.string("arguments")
            if call_id is None or fname is None or arguments is None:
                raise invalid(f"'{name}' needs call_id, name and arguments (strings)", name)
            call = {"id": call_id, "type": "function", "function": {"name": fname, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.string("call_id"), item.string("output")
            if call_id is None or output is None:
                raise invalid(f"'{name}' needs call_id and output (strings)", name)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":  # an earlier answer's reasoning: templates drop it from history
            for key in ("summary", "content", "encrypted_content"):
                item.raw(key)
        else:
            raise unsupported(f"{name}.type", f": got {kind!r}")
        item.finish()
    return messages


def _tool(raw: Any, name: str) -> dict[str, Any]:
    tool = _object(raw, name)
    if tool.string("type") != "function":
        raise unsupported(f"{name}.type", ": only function tools")
    function = {
        key: tool.raw(key) for key in ("name", "description", "parameters", "strict") if tool.has(key)
    }
    tool.finish()
    return {"type": "function", "function": function}


def _format(raw: Any) -> dict[str, Any]:
    """text.format -> response_format: json_schema's fields sit beside its type here."""
    text = _object(raw, "text")
    fmt = text.raw("format")
    text.raw("verbosity")
    text.finish()
    if fmt is None:
        return {"type": "text"}
    spec = _object(fmt, "text.format")
    kind = spec.string("type")
    if kind != "json_schema":
        spec.finish()
        return {"type": kind}
    inner = {key: spec.raw(key) for key in ("name", "schema", "strict", "description") if spec.has(key)}
    spec.finish()
    return {"type": "json_schema", "json_schema": inner}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid4().hex}"


class ResponseBuilder:
    """One choice's chat chunks -> the Response object's output items and the stream's events.

    Items open as their first text arrives and close when another kind starts or the answer ends:
    reasoning, then the message, then function calls, as the chat formatter splits them."""

    def __init__(self, request: dict[str, Any], model: str, created: int) -> None:
        self.id = _id("resp")
        self.model = model
        self.created = created
        self._request = request  # echoed back: instructions, tools, sampling...
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._seq = 0
        self.status = "in_progress"
        self.incomplete: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self.response()),
            self.event("response.in_progress", response=self.response()),
        ]

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for one chat delta (role, reasoning_content, content, tool_calls)."""
        events: list[dict[str, Any]] = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if "id" in call:  # a new call (the formatter sends each whole)
                events += self._close()
                item = {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": function["name"],
                        "arguments": "", "status": "in_progress"}  # fmt: skip
                events += self._add(item)
            if function.get("arguments") and self._open is not None:
                self._open["arguments"] += function["arguments"]
                events.append(
                    self._item_event("response.function_call_arguments.delta", delta=function["arguments"])
                )
        return events

    def finish(self, finish_reason: str | None, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """Close what is open; the last event: response.completed, or response.incomplete at max_output_tokens."""
        events = self._close()
        self.usage = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {
                "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            },
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }
        if finish_reason == "length":
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
            return [*events, self.event("response.incomplete", response=self.response())]
        self.status = "completed"
        return [*events, self.event("response.completed", response=self.response())]

    def response(self) -> dict[str, Any]:
        r = self._request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": r.get("instructions"),
            "max_output_tokens": r.get("max_output_tokens"),
            "model": self.model,
            "output": deepcopy(self.output),
            "parallel_tool_calls": r.get("parallel_tool_calls", True),
            "temperature": r.get("temperature"),
            "tool_choice": r.get("tool_choice", "auto"),
            "tools": r.get("tools", []),
            "top_p": r.get("top_p"),
            "text": r.get("text", {"format": {"type": "text"}}),
            "metadata": r.get("metadata") or {},
            "store": False,
            "usage": self.usage,
        }

    # -- items ---------------------------------------------------------------------------------

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            events += self._close()
            if kind == "reasoning":
                reasoning: dict[str, Any] = {"type": "reasoning", "id": _id("rs"), "summary": [],
                                             "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}  # fmt: skip
                events += self._add(reasoning)
            else:
                message: dict[str, Any] = {"type": "message", "id": _id("msg"), "status": "in_progress",
                                           "role": "assistant", "content": []}  # fmt: skip
                events += self._add(message)
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                message["content"].append(part)
                events.append(
                    self._item_event("response.content_part.added", content_index=0, part=deepcopy(part))
                )
        assert self._open is not None
        self._open["content"][0]["text"] += text
        if kind == "reasoning":
            events.append(self._item_event("response.reasoning_text.delta", content_index=0, delta=text))
        else:
            events.append(
                self._item_event("response.output_text.delta", content_index=0, delta=text, logprobs=[])
            )
        return events

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        self._open = item
        return [
            self.event("response.output_item.added", output_index=len(self.output) - 1, item=deepcopy(item))
        ]

    def _item_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        assert self._open is not None
        return self.event(kind, item_id=self._open["id"], output_index=len(self.output) - 1, **fields)

    def _close(self) -> list[dict[str, Any]]:
        item, events = self._open, []
        if item is None:
            return []
        if item["type"] == "reasoning":
            events.append(
                self._item_event(
                    "response.reasoning_text.done", content_index=0, text=item["content"][0]["text"]
                )
            )
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(
                self._item_event("response.output_text.done", content_index=0, text=part["text"], logprobs=[])
            )
            events.append(
                self._item_event("response.content_part.done", content_index=0, part=deepcopy(part))
            )
        else:
            events.append(
                self._item_event(
                    "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"]
                )
            )
        item["status"] = "completed"
        events.append(
            self.event("response.output_item.done", output_index=len(self.output) - 1, item=deepcopy(item))
        )
        self._open = None
        return events
