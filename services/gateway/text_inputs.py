"""Validation of the text inputs every front end takes: prompts and chat messages."""

from __future__ import annotations

from typing import Any

from services.gateway.body import Body, kind_of, unsupported
from services.gateway.errors import invalid
from services.gateway.request import ChatMessage, Prompt, PromptKind

# Roles the chat template is given; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
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


def parse_messages(value: Any, param: str) -> tuple[ChatMessage, ...]:
    """Chat messages: a non-empty array of {role, content, name?} with text content."""
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be an array of messages, got {kind_of(value)}", param)
    if not value:
        raise invalid(f"'{param}' must hold at least one message", param)
    out = []
    for i, raw in enumerate(value):
        name = f"{param}[{i}]"
        if not isinstance(raw, dict):
            raise invalid(f"'{name}' must be an object, got {kind_of(raw)}", name)
        body = Body(raw, name + ".")
        role = body.string("role")
        if role is None:
            raise invalid(f"'{name}.role' is required", f"{name}.role")
        if role not in CHAT_ROLES:
            raise invalid(f"'{name}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"{name}.role")
        for key in ("tool_calls", "function_call", "tool_call_id", "audio", "refusal"):
            body.reject(key, lambda v: v in ([], ""))
        content = body.raw("content")
        if content is None and role != "assistant":
            raise invalid(f"'{name}.content' is required", f"{name}.content")
        text = "" if content is None else _content(content, f"{name}.content")
        speaker = body.string("name")
        body.finish()
        out.append(ChatMessage("system" if role == "developer" else role, text, speaker))
    return tuple(out)
