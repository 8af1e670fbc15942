"""Rendering Hugging Face chat templates with jinja2, the way transformers does, without transformers.

The environment mirrors ``transformers.utils.chat_template_utils._compile_jinja_template``: an immutable
sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a JSON ``tojson``
filter that does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace``. The ``{% generation %}`` tag (used to mark assistant tokens in training) renders its body.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "compile_chat_template", "normalize_messages", "render_chat_template"]

# Names a message's reasoning is passed under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or could not be rendered."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: render the body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's own API

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` inside templates, without exposing the real ``dict`` type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (and cache) a chat template in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild a value from plain JSON-like types (the sandbox sees nothing richer)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message_to_dict(message: Any) -> dict[str, Any]:
    if isinstance(message, Mapping) or (dataclasses.is_dataclass(message) and not isinstance(message, type)):
        data = _plain(message)
    elif callable(getattr(message, "model_dump", None)):
        data = _plain(message.model_dump())
    elif hasattr(message, "role") and hasattr(message, "content"):
        # Any object with role/content attributes (e.g. a protobuf message); "name" too when set.
        data = {"role": _plain(message.role), "content": _plain(message.content)}
        name = getattr(message, "name", None)
        if name:
            data["name"] = _plain(name)
    else:
        raise TypeError(f"chat messages must be mappings or objects with role and content, got {message!r}")
    if not isinstance(data, dict):
        raise TypeError(f"chat messages must be mappings or objects with role and content, got {message!r}")
    return data


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages as fresh plain dicts, as transformers passes them to the template.

    Keys whose value is ``None`` are dropped (OpenAI clients send ``content: null``), and a message's
    reasoning is aliased under ``reasoning_content`` and ``thinking``.
    """
    out = []
    for message in messages:
        data = {k: v for k, v in _message_to_dict(message).items() if v is not None}
        reasoning = next((data[key] for key in _REASONING_FIELDS if data.get(key) is not None), None)
        if reasoning is not None:
            data = {"thinking": reasoning, **data, "reasoning_content": reasoning}
        out.append(data)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render ``messages`` through ``template`` exactly as transformers' ``apply_chat_template`` does.

    ``continue_final_message``: leave the last message open, so that the model continues it (the
    beginning of an answer written by the caller) instead of starting a turn of its own: the
    rendering ends right after that message's text, without what the template writes after it.
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be set: the first leaves "
            "the last message open for the model to continue, the second starts a new turn after it"
        )
    compiled = compile_chat_template(template)
    variables = {**(special_tokens or {}), **kwargs}
    plain = normalize_messages(messages)
    if continue_final_message:
        plain[-1] = _mark_end(plain[-1])
    try:
        rendered = compiled.render(
            messages=plain,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(str(exc)) from exc
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        # the template's own expressions failed on these values (e.g. a caller's variable of
        # another type than the template expects): the conversation cannot be rendered
        raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from exc
    return _cut_at_mark(rendered) if continue_final_message else rendered


# Appended to the text of a message to continue: the rendering is cut where the template put it.
# Its trailing space tells whether the template trimmed the message's text (then its trailing
# whitespace goes too, as the template would have dropped it).
_END_MARK = "<|scalellm-continue-here|> "


def _mark_end(message: dict[str, Any]) -> dict[str, Any]:
    """The final message with the mark after its text (the last text part of a list content)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": content + _END_MARK}
    if isinstance(content, list):
        for i in reversed(range(len(content))):
            part = content[i]
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                marked = {**part, "text": part["text"] + _END_MARK}
                return {**message, "content": [*content[:i], marked, *content[i + 1 :]]}
    raise ValueError("continue_final_message: the final message has no text to continue")


def _cut_at_mark(rendered: str) -> str:
    at = rendered.rfind(_END_MARK.rstrip())
    if at < 0:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not write the final message's text as "
            "given, so it cannot be continued"
        )
    if rendered.startswith(_END_MARK, at):
        return rendered[:at]
    return rendered[:at].rstrip()
