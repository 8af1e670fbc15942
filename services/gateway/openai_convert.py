"""The one converter between OpenAI's JSON and the shared request types (scalellm.types).

In: an OpenAI body's sampling fields -> SamplingParams. The JSON types are checked here (Body);
the values by SamplingParams, once, and a bad one is a 400 naming the field as the client spelt
it. Out: finish reason, usage, timings (our opt-in extension) and token logprobs in OpenAI's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scalellm.types import FinishReason, InvalidParameter, SamplingParams, Timings, TokenLogprobs, Usage
from services.gateway.body import Body, kind_of
from services.gateway.errors import GatewayError, invalid
from services.gateway.model import ServedModel

OPENAI_MAX_TEMPERATURE = 2.0
"""OpenAI's API takes temperature in [0, 2] (the engine would take up to 100; gRPC clients may)."""


# ---- in ------------------------------------------------------------------------------------------


def sampling_from_openai(
    body: Body, max_tokens: int | None, logprobs: int | None, names: Mapping[str, str] | None = None
) -> SamplingParams:
    """The body's sampling fields (max_tokens and logprobs already read, as each API spells them;
    ``names`` maps a SamplingParams field to the body's name for it in error messages)."""
    stop_ids = body.raw("stop_token_ids")
    if stop_ids is not None and (
        not isinstance(stop_ids, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in stop_ids)
    ):
        raise invalid("'stop_token_ids' must be an array of non-negative integers", "stop_token_ids")
    try:
        return SamplingParams(
            n=body.integer("n", 1),
            temperature=body.number("temperature", 1.0, lo=0.0, hi=OPENAI_MAX_TEMPERATURE),
            top_p=body.number("top_p", 1.0),
            top_k=body.integer("top_k", 0),
            min_p=body.number("min_p", 0.0),
            seed=body.integer("seed"),
            max_tokens=max_tokens,
            stop_token_ids=tuple(stop_ids or ()),
            ignore_eos=body.boolean("ignore_eos"),
            logprobs=logprobs,
            skip_special_tokens=body.boolean("skip_special_tokens", True),
            stop=_stop(body.raw("stop")),
            include_stop_str_in_output=body.boolean("include_stop_str_in_output"),
        )
    except InvalidParameter as exc:
        raise _invalid(exc, (names or {}).get(exc.field, exc.field)) from None


def _stop(value: Any) -> tuple[str, ...]:
    """Stop strings: absent, one string or an array of strings (SamplingParams checks each one)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"'stop' must be a string or an array of strings, got {kind_of(value)}", "stop")
    return tuple(items)


def _invalid(exc: InvalidParameter, param: str) -> GatewayError:
    return invalid(exc.message_for(param), param, "invalid_value")


# ---- out -----------------------------------------------------------------------------------------


def finish_reason_to_openai(reason: FinishReason | None) -> str | None:
    return reason.value if reason is not None else None


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object (the counts of a whole request: see OpenAIFormatter.usage)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def timings_to_openai(t: Timings) -> dict[str, float | int]:
    """A choice's ``"timings"`` (seconds, to the microsecond), sent when the client asks."""
    return {
        "gateway": round(t.gateway, 6),
        "queue": round(t.queue, 6),
        "prefill": round(t.prefill, 6),
        "transfer": round(t.transfer, 6),
        "decode": round(t.decode, 6),
        "transfer_bytes": t.transfer_bytes,
        "total": round(t.total, 6),
        "worker_call": round(t.worker_call, 6),
    }


def chat_logprobs_to_openai(entries: Sequence[TokenLogprobs], model: ServedModel) -> list[dict[str, Any]]:
    """Chat completions' ``logprobs.content`` entries."""
    return [
        {
            "token": model.token_text(e.token_id),
            "logprob": _finite(e.logprob),
            "bytes": list(model.token_bytes(e.token_id)),
            "top_logprobs": [
                {
                    "token": model.token_text(token_id),
                    "logprob": _finite(logprob),
                    "bytes": list(model.token_bytes(token_id)),
                }
                for token_id, logprob in e.top
            ],
        }
        for e in entries
    ]


def completion_logprobs_to_openai(
    entries: Sequence[TokenLogprobs], model: ServedModel, offset: int
) -> tuple[dict[str, list[Any]], int]:
    """Completions' ``logprobs`` block for entries whose text starts at ``offset`` in the choice's
    text; returns the block and the offset after it."""
    tokens, offsets = [], []
    for e in entries:
        text = model.token_text(e.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    block: dict[str, list[Any]] = {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [{model.token_text(t): _finite(v) for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }
    return block, offset


def _finite(logprob: float) -> float:
    """Logprobs as OpenAI reports them: -9999.0 stands for -inf (JSON has no infinities)."""
    return logprob if logprob >= -9999.0 else -9999.0
