"""The one converter between OpenAI's JSON and the shared request types (scalellm.types).

In: an OpenAI body's sampling fields -> SamplingParams. The JSON types are checked here (Body:
typed, named reads of a JSON object, so every bad value is a 400 that names its field; each read
marks the field as known and ``finish()`` rejects whatever the client sent that no read asked for;
``null`` counts as absent, as in OpenAI's API; booleans are never numbers); the values by
SamplingParams, once, and a bad one is a 400 naming the field as the client spelt it. Out: finish
reason, usage, timings (our opt-in extension) and token logprobs in OpenAI's shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

from scalellm.types import FinishReason, InvalidParameter, SamplingParams, Timings, TokenLogprobs, Usage
from services.gateway.admission import ServedModel
from services.gateway.request import GatewayError, invalid

# ---- typed reads of a JSON body ------------------------------------------------------------------


_MISSING = object()
_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a dict; 400 for malformed JSON, NaN/Infinity, or a non-object."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {kind_of(data)}", code="invalid_json")
    return data


def kind_of(value: Any) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def unsupported(name: str, why: str = "") -> GatewayError:
    return invalid(f"'{name}' is not supported by this server{why}", name, "unsupported_parameter")


class Body:
    """Reads of one JSON object; ``prefix`` qualifies names in messages ("messages[2].")."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return self.prefix + key

    def raw(self, key: str) -> Any:
        """The value (None when absent or null); marks the field known."""
        self._seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _typed(self, key: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise invalid(
                f"'{self.name(key)}' must be {what}, got {kind_of(value)}", self.name(key), "invalid_type"
            )
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        return self._typed(key, (bool,), "a boolean", default)

    def string(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, (str,), "a string", default)

    @overload
    def integer(self, key: str, default: int) -> int: ...

    @overload
    def integer(self, key: str, default: None = None) -> int | None: ...

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self._typed(key, (int,), "an integer", _MISSING)
        return default if value is _MISSING else value

    def number(self, key: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        """A finite number (ints become floats), within [lo, hi] when given."""
        value = self._typed(key, (int, float), "a number", _MISSING)
        if value is _MISSING:
            return default
        value = float(value)
        in_range = (lo is None or value >= lo) and (hi is None or value <= hi)
        if not (math.isfinite(value) and in_range):
            raise invalid(_range_message(self.name(key), value, lo, hi), self.name(key), "invalid_value")
        return value

    def reject(self, key: str, is_noop: Callable[[Any], bool], why: str = "") -> None:
        """Refuse a known-but-unsupported field unless its value changes nothing."""
        value = self.raw(key)
        if value is not None and not is_noop(value):
            raise unsupported(self.name(key), why)

    def finish(self) -> None:
        """Reject every field no read asked for."""
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            name = self.name(unknown[0])
            raise invalid(f"unknown parameter '{name}'", name, "unknown_parameter")


def _range_message(name: str, value: float, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"'{name}' must be in [{lo:g}, {hi:g}], got {value:g}"
    if lo is not None:
        return f"'{name}' must be >= {lo:g}, got {value:g}"
    if hi is not None:
        return f"'{name}' must be <= {hi:g}, got {value:g}"
    return f"'{name}' must be a finite number, got {value:g}"


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
