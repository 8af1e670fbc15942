"""The gRPC Gateway's messages to and from the gateway's typed requests and results."""

from __future__ import annotations

import math

from scalellm.v1 import common_pb2, gateway_pb2
from services.gateway.errors import invalid
from services.gateway.request import ChatMessage, GenerationSpec, Prompt, PromptKind, Sampling
from services.gateway.results import ChoiceUpdate
from services.gateway.text_inputs import CHAT_ROLES, parse_stop

MAX_LOGPROBS = 20


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
    if which == "token_ids":
        return Prompt(PromptKind.TOKENS, "token_ids", token_ids=(tuple(msg.token_ids.ids),))
    if which == "chat":
        return Prompt(PromptKind.CHAT, "chat", messages=_messages(msg.chat, "chat"))
    raise invalid("a prompt is required: set text, token_ids or chat", "prompt")


def _check(name: str, ok: bool, rule: str, value: object) -> None:
    if not ok:
        raise invalid(f"'sampling.{name}' must be {rule}, got {value!r}", f"sampling.{name}")


def sampling_from_proto(s: common_pb2.SamplingParams) -> Sampling:
    """common.SamplingParams with its documented defaults (unset temperature: greedy)."""
    _check(
        "temperature",
        math.isfinite(s.temperature) and 0 <= s.temperature <= 100,
        "in [0, 100]",
        s.temperature,
    )
    _check("top_p", math.isfinite(s.top_p) and 0 <= s.top_p <= 1, "in (0, 1] (0: unset)", s.top_p)
    _check("top_k", s.top_k >= 0, ">= 0", s.top_k)
    _check("min_p", math.isfinite(s.min_p) and 0 <= s.min_p <= 1, "in [0, 1]", s.min_p)
    seed = s.seed if s.HasField("seed") else None
    _check("seed", seed is None or seed < 2**63, "below 2**63", seed)
    logprobs = s.logprobs if s.HasField("logprobs") else None
    _check("logprobs", logprobs is None or logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]", logprobs)
    return Sampling(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=seed,
        max_tokens=s.max_tokens or None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=logprobs,
    )


def spec_from_proto(msg: gateway_pb2.GatewayGenerateRequest) -> GenerationSpec:
    """A Generate request as a GenerationSpec; INVALID_ARGUMENT naming the field otherwise."""
    return GenerationSpec(
        model=msg.model or None,
        prompt=prompt_from_proto(msg),
        sampling=sampling_from_proto(msg.sampling),
        n=msg.n or 1,
        stop=parse_stop(list(msg.stop), "stop"),
        include_stop=msg.include_stop_str,
        skip_special_tokens=not msg.keep_special_tokens,
        priority=msg.priority,
    )


def update_to_proto(update: ChoiceUpdate, request_id: str) -> gateway_pb2.GatewayGenerateResponse:
    """One choice update as a response message (the worker's logprob messages are reused)."""
    out = gateway_pb2.GatewayGenerateResponse(
        request_id=request_id, index=update.index, token_ids=update.token_ids, text=update.text
    )
    if update.logprobs:
        out.logprobs.extend(update.logprobs)
    if update.finish is not None:
        out.finish_reason = update.finish.proto
        out.stop_str = update.stop_str or ""
        if update.usage is not None:
            u = update.usage
            out.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    cached_prompt_tokens=u.cached_prompt_tokens,
                )
            )
        if update.timings is not None:
            out.timings.CopyFrom(update.timings.to_proto())
    return out
