"""Tool calling, torch-free: the tools a request offers, the tool calls parsed back out of the
model's text, and the grammar that forces a call when the client requires one.

How a tool call is written depends on the model family; the format is chosen from the chat
template (``ToolFormat.for_template``):

    HERMES       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Qwen2/2.5/3, Hermes,
                 SmolLM2; the body may also be a JSON array of such objects)
    LLAMA3_JSON  {"name": ..., "parameters": {...}}; {...}                  (Llama 3.x, optionally
                 after <|python_tag|>): the whole answer is the call(s)
    MISTRAL      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]        (Mistral 7B v0.3, Nemo,
                 Small: [TOOL_CALLS] is a special token, so the text is usually the array alone);
                 the whole answer is the calls, and call ids are 9 letters and digits, the only
                 ids Mistral's templates accept back (a history's other ids are mapped to such
                 ids: ``ToolFormat.template_messages``)
    MISTRAL_V11  content[TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}  (Mistral Small 3.1+,
                 Devstral, Magistral: templates that write [ARGS]); the tags are special tokens,
                 so the answer is detokenized with them (``ToolFormat.needs_special_tokens``)

``ToolCallStream`` reads one choice's text as it streams and splits it into content and tool calls
(text that only might open a call is held back until it is clear). How the choice is steered:

    ToolMode.NONE      tools are shown to the template, nothing is parsed
    ToolMode.AUTO      the model decides; its text is parsed in the model's format
    ToolMode.REQUIRED  the grammar forces a JSON array of {"name", "parameters"} calls (vLLM's
                       form, independent of the model's format), parsed when the choice ends
    ToolMode.NAMED     the grammar forces the named function's arguments; the text *is* them
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scalellm.text.stop import partial_suffix

__all__ = [
    "Tool",
    "ToolCall",
    "ToolCallStream",
    "ToolChoice",
    "ToolFormat",
    "ToolMode",
    "parse_whole",
    "required_schema",
]


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call (OpenAI's ``{"type": "function", "function": {...}}``)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    """A JSON Schema object; None: any JSON object."""
    strict: bool | None = None

    def to_openai(self) -> dict[str, Any]:
        """The tool as OpenAI (and every chat template) spells it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}

    @property
    def schema(self) -> Mapping[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text (as OpenAI returns them)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def to_template(self) -> dict[str, Any]:
        """The call as chat templates read it: arguments as an object when they parse as one
        (Qwen's template applies ``tojson`` to them, as transformers passes them)."""
        try:
            arguments: Any = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


class ToolMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """The tools of a request and how the answer must use them."""

    tools: tuple[Tool, ...]
    mode: ToolMode
    function: str | None = None
    """The forced function (NAMED)."""
    parallel: bool = True
    """parallel_tool_calls: False keeps only the first call."""

    def grammar_schema(self) -> Mapping[str, Any] | None:
        """The JSON Schema the output must follow, or None when the model writes freely."""
        if self.mode is ToolMode.REQUIRED:
            return required_schema(self.tools, self.parallel)
        if self.mode is ToolMode.NAMED:
            return next(t.schema for t in self.tools if t.name == self.function)
        return None


def required_schema(tools: Sequence[Tool], parallel: bool = True) -> dict[str, Any]:
    """A JSON array of at least one {"name": <a tool>, "parameters": <its arguments>} (vLLM's form)."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": t.schema},
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolFormat(enum.Enum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    MISTRAL = "mistral"
    MISTRAL_V11 = "mistral_v11"

    @classmethod
    def for_template(cls, template: str | None) -> ToolFormat:
        """The format a chat template teaches: Mistral's when it writes [TOOL_CALLS] (the newer
        form when it writes [ARGS] too), Llama 3's when it speaks of ipython / python_tag without
        Hermes tags, else Hermes (also the default for templates that show no tools)."""
        text = template or ""
        if "<tool_call>" not in text and _MISTRAL_TAG in text:
            return cls.MISTRAL_V11 if _ARGS_TAG in text else cls.MISTRAL
        if "<tool_call>" not in text and ("<|python_tag|>" in text or "ipython" in text):
            return cls.LLAMA3_JSON
        return cls.HERMES

    @property
    def needs_special_tokens(self) -> bool:
        """Whether the calls are read from special tokens, which the answer's text must keep."""
        return self is ToolFormat.MISTRAL_V11

    def new_call_id(self) -> str:
        """An id for a call the model made, in the form the model's template takes back."""
        if self in _MISTRAL_FORMATS:
            return "".join(secrets.choice(_ALNUM) for _ in range(9))
        return f"call_{uuid.uuid4().hex[:24]}"

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A conversation's messages with their tool-call ids in the form this format's templates
        take back. Mistral's refuse any id but 9 letters and digits, while clients (and other
        servers' answers) bring ids of their own: each other id becomes one derived from it, the
        same for a call and its answer and in every request (vLLM truncates ids instead, which
        can leave an underscore, or make two ids one)."""
        if self not in _MISTRAL_FORMATS:
            return messages
        out = []
        for message in messages:
            calls, answered = message.get("tool_calls"), message.get("tool_call_id")
            if calls:
                message = {
                    **message,
                    "tool_calls": [{**c, "id": _mistral_id(c["id"])} if "id" in c else c for c in calls],
                }
            if answered is not None:
                message = {**message, "tool_call_id": _mistral_id(answered)}
            out.append(message)
        return out


_MISTRAL_FORMATS = frozenset({ToolFormat.MISTRAL, ToolFormat.MISTRAL_V11})  # 9-character call ids
_ALNUM = string.ascii_letters + string.digits


def _mistral_id(call_id: Any) -> Any:
    """call_id if it is 9 letters and digits, else 9 of them derived from it (None stays None)."""
    if not isinstance(call_id, str) or (len(call_id) == 9 and call_id.isascii() and call_id.isalnum()):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        n, d = divmod(n, len(_ALNUM))
        digits.append(_ALNUM[d])
    return "".join(digits)


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"
_ARGS_TAG, _CALL_ID_TAG = "[ARGS]", "[CALL_ID]"


def _calls_from_json(text: str, arguments_key: str) -> list[ToolCall] | None:
    """Calls from one JSON object or an array of them ({"name", <arguments_key>}); None if the text
    is not that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get(arguments_key, item.get("arguments", item.get("parameters", {})))
        text_args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(item["name"], text_args))
    return calls


def _split_llama3(text: str) -> list[ToolCall] | None:
    """Llama 3's answer: optional <|python_tag|>, then JSON objects separated by ';'."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        found = _calls_from_json(json.dumps(value), "parameters")
        if found is None:
            return None
        calls.extend(found)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def _split_mistral(text: str) -> list[ToolCall] | None:
    """Mistral's answer: optional [TOOL_CALLS], then a JSON array of {"name", "arguments"}."""
    body = text.strip().removeprefix(_MISTRAL_TAG).strip()
    return _calls_from_json(body, "arguments") if body.startswith(("[", "{")) else None


def _split_mistral_v11(text: str) -> list[ToolCall] | None:
    """Mistral's newer calls: [TOOL_CALLS]name[ARGS]{...} each ([CALL_ID]id may come before
    [ARGS]); None unless the text is only such calls."""
    head, *parts = text.strip().split(_MISTRAL_TAG)
    if head.strip() or not parts:
        return None
    calls = []
    for part in parts:
        name, tagged, arguments = part.partition(_ARGS_TAG)
        name = name.partition(_CALL_ID_TAG)[0].strip()
        try:
            value = json.loads(arguments)
        except ValueError:
            return None
        if not tagged or not name or not isinstance(value, dict):
            return None
        calls.append(ToolCall(name, json.dumps(value, ensure_ascii=False)))
    return calls


def _opens_call(fmt: ToolFormat, head: str) -> bool | None:
    """Whether an answer beginning with head (stripped) is a call, in a whole-answer format;
    None while it cannot tell yet."""
    tag, starts = (_PYTHON_TAG, ("{",)) if fmt is ToolFormat.LLAMA3_JSON else (_MISTRAL_TAG, ("[",))
    if head.startswith(tag):
        return True
    if tag.startswith(head):  # nothing yet, or the tag begun
        return None
    if fmt is ToolFormat.MISTRAL and head.startswith("["):  # an array of calls, or text like "[1]"
        inside = head[1:].lstrip()
        return inside.startswith("{") if inside else None
    return head.startswith(starts)


@dataclass(slots=True)
class ToolDelta:
    """What one piece of a choice's text adds: visible content and finished (or, NAMED, started
    and growing) calls. ``arguments`` is NAMED's next piece of the arguments of call 0."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    arguments: str = ""


class ToolCallStream:
    """Splits one choice's streamed text into content and tool calls (see the module's table)."""

    def __init__(self, choice: ToolChoice, fmt: ToolFormat) -> None:
        self.choice = choice
        self.format = fmt
        self.calls: list[ToolCall] = []  # every call so far
        self._pending = ""  # text not yet released: a possible tag, a call's body, a whole answer
        self._in_call = False
        self._is_call: bool | None = None  # LLAMA3_JSON: whether the answer is a call (None: not yet clear)
        self._named: ToolCall | None = None

    @property
    def parses(self) -> bool:
        return self.choice.mode is not ToolMode.NONE

    def feed(self, text: str) -> ToolDelta:
        mode = self.choice.mode
        if mode is ToolMode.NONE:
            return ToolDelta(content=text)
        if mode is ToolMode.NAMED:
            return self._feed_named(text)
        self._pending += text
        if mode is ToolMode.REQUIRED:
            return ToolDelta()
        if self.format is ToolFormat.HERMES:
            return self._feed_hermes()
        if self.format is ToolFormat.MISTRAL_V11:
            return self._feed_mistral_v11()
        return self._feed_whole_answer()

    def finish(self) -> ToolDelta:
        """Whatever was held back, once the choice ended."""
        mode, pending = self.choice.mode, self._pending
        self._pending = ""
        if mode is ToolMode.REQUIRED:
            calls = _calls_from_json(pending, "parameters")
            return self._add(calls) if calls else ToolDelta(content=pending)
        if mode is ToolMode.AUTO and self.format is ToolFormat.MISTRAL_V11:
            calls = _split_mistral_v11(pending) if self._in_call else None
            return self._add(calls) if calls else ToolDelta(content=pending)
        if mode is ToolMode.AUTO and self.format is not ToolFormat.HERMES and self._is_call is not False:
            split = _split_llama3 if self.format is ToolFormat.LLAMA3_JSON else _split_mistral
            calls = split(pending)
            return self._add(calls) if calls else ToolDelta(content=pending)
        if mode is ToolMode.AUTO and self._in_call:  # a call the model did not close
            calls = _calls_from_json(pending, "arguments")
            return self._add(calls) if calls else ToolDelta(content=_OPEN + pending)
        return ToolDelta(content=pending if not self.calls or pending.strip() else "")

    # -- formats -----------------------------------------------------------------------------------

    def _feed_named(self, text: str) -> ToolDelta:
        if self._named is None:
            self._named = ToolCall(self.choice.function or "", "", self.format.new_call_id())
            self.calls.append(self._named)
            return ToolDelta(calls=[self._named], arguments=text)
        return ToolDelta(arguments=text)

    def _feed_hermes(self) -> ToolDelta:
        out = ToolDelta()
        while True:
            if self._in_call:
                end = self._pending.find(_CLOSE)
                if end < 0:
                    return out
                body, self._pending = self._pending[:end], self._pending[end + len(_CLOSE) :]
                self._in_call = False
                calls = _calls_from_json(body.strip(), "arguments")
                if calls:
                    out.calls.extend(self._add(calls).calls)
                else:
                    out.content += _OPEN + body + _CLOSE
                continue
            start = self._pending.find(_OPEN)
            if start >= 0:
                before, self._pending = self._pending[:start], self._pending[start + len(_OPEN) :]
                out.content += before if not self.calls or before.strip() else ""
                self._in_call = True
                continue
            release = self._release(_OPEN)
            if release.strip() or not self.calls:
                out.content += release
            return out

    def _feed_mistral_v11(self) -> ToolDelta:
        """Content until the first [TOOL_CALLS]; from there the calls are held to the end."""
        if self._in_call:
            return ToolDelta()
        start = self._pending.find(_MISTRAL_TAG)
        if start >= 0:
            self._in_call = True
            before, self._pending = self._pending[:start], self._pending[start:]
            return ToolDelta(content=before)
        return ToolDelta(content=self._release(_MISTRAL_TAG))

    def _release(self, tag: str) -> str:
        """Take out of the pending text all that cannot be the beginning of tag."""
        cut = len(self._pending) - partial_suffix(self._pending, tag)
        release, self._pending = self._pending[:cut], self._pending[cut:]
        return release

    def _feed_whole_answer(self) -> ToolDelta:
        """LLAMA3_JSON and MISTRAL: an answer that opens as a call is held to its end."""
        if self._is_call is None:
            self._is_call = _opens_call(self.format, self._pending.lstrip())
        if self._is_call is not False:
            return ToolDelta()  # a call (wait for the end) or not yet clear
        text, self._pending = self._pending, ""
        return ToolDelta(content=text)

    def _add(self, calls: list[ToolCall]) -> ToolDelta:
        if not self.choice.parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        calls = [replace(call, id=self.format.new_call_id()) for call in calls]
        self.calls.extend(calls)
        return ToolDelta(calls=calls)


def parse_whole(choice: ToolChoice, fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and calls (what streaming it through ToolCallStream gives)."""
    if choice.mode is ToolMode.NAMED:
        return "", [ToolCall(choice.function or "", text, fmt.new_call_id())]
    stream = ToolCallStream(choice, fmt)
    content = stream.feed(text).content + stream.finish().content
    return content, stream.calls
