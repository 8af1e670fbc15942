"""The gRPC Gateway's messages to and from the gateway's typed requests and results (the shared
types go through scalellm.types.proto, as on the workers)."""

from __future__ import annotations

from dataclasses import replace

from scalellm.types import InvalidParameter
from scalellm.types.proto import (
    finish_reason_to_proto,
    logprobs_to_proto,
    sampling_from_proto,
    timings_to_proto,
    usage_to_proto,
)
from scalellm.v1 import gateway_pb2
from services.gateway.errors import invalid
from services.gateway.request import ChatMessage, GenerationSpec, Prompt, PromptKind
from services.gateway.results import ChoiceUpdate
from services.gateway.text_inputs import CHAT_ROLES


def _messages(chat: gateway_pb2.ChatMessages, param: str) -> tuple[ChatMessage, ...]:
    if not chat.messages:
        raise invalid(f"'{param}.messages' must hold at least one message", param)
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise invalid(
                f"'{param}.messages[{i}].role' must be one of {sorted(CHAT_ROLES)}, got {m.role!r}", param
            )
        out.append(ChatMessage("system" if m.role == "developer" else m.role, m.content, m.name or None))
    return tuple(out)


def prompt_from_proto(msg: gateway_pb2.GatewayGenerateRequest | gateway_pb2.TokenizeRequest) -> Prompt:
    """The oneof `prompt`; INVALID_ARGUMENT when none is set."""
    which = msg.WhichOneof("prompt")
    if which == "text":
        return Prompt(PromptKind.TEXT, "text", texts=(msg.text,))
    if which == "token_ids" and isinstance(msg, gateway_pb2.GatewayGenerateRequest):
        return Prompt(PromptKind.TOKENS, "token_ids", token_ids=(tuple(msg.token_ids.ids),))
    if which == "chat":
        return Prompt(PromptKind.CHAT, "chat", messages=_messages(msg.chat, "chat"))
    raise invalid("a prompt is required: set text, token_ids or chat", "prompt")


_TOP_LEVEL = frozenset({"n", "stop", "include_stop_str_in_output", "skip_special_tokens"})
"""SamplingParams fields that GatewayGenerateRequest holds itself, not in its `sampling`."""


def spec_from_proto(msg: gateway_pb2.GatewayGenerateRequest) -> GenerationSpec:
    """A Generate request as a GenerationSpec; INVALID_ARGUMENT naming the field otherwise."""
    prompt = prompt_from_proto(msg)
    try:
        sampling = replace(
            sampling_from_proto(msg.sampling),
            n=msg.n or 1,
            stop=tuple(msg.stop),
            include_stop_str_in_output=msg.include_stop_str,
            skip_special_tokens=not msg.keep_special_tokens,
        )
    except InvalidParameter as exc:
        param = exc.field if exc.field in _TOP_LEVEL else f"sampling.{exc.field}"
        raise invalid(exc.message_for(param), param) from None
    return GenerationSpec(model=msg.model or None, prompt=prompt, sampling=sampling, priority=msg.priority)


def update_to_proto(update: ChoiceUpdate, request_id: str) -> gateway_pb2.GatewayGenerateResponse:
    """One choice update as a response message."""
    out = gateway_pb2.GatewayGenerateResponse(
        request_id=request_id, index=update.index, token_ids=update.token_ids, text=update.text
    )
    if update.logprobs:
        out.logprobs.extend(logprobs_to_proto(lp) for lp in update.logprobs)
    if update.finish is not None:
        out.finish_reason = finish_reason_to_proto(update.finish)
        out.stop_str = update.stop_str or ""
        if update.usage is not None:
            out.usage.CopyFrom(usage_to_proto(update.usage))
        if update.timings is not None:
            out.timings.CopyFrom(timings_to_proto(update.timings))
    return out
