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
from typing import Any, Protocol, overload

from scalellm.types import (
    FinishReason,
    InvalidParameter,
    SamplingParams,
    StructuredOutput,
    Timings,
    TokenLogprobs,
    Usage,
)
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
    body: Body,
    max_tokens: int | None,
    logprobs: int | None,
    names: Mapping[str, str] | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The body's sampling fields (max_tokens, logprobs and prompt_logprobs already read, as each
    API spells them; ``names`` maps a SamplingParams field to the body's name for it in error
    messages)."""
    names = dict(names or {})
    structured, names["structured_output"] = _structured_output(body)
    try:
        return SamplingParams(
            n=body.integer("n", 1),
            temperature=body.number("temperature", 1.0, lo=0.0, hi=OPENAI_MAX_TEMPERATURE),
            top_p=body.number("top_p", 1.0),
            top_k=body.integer("top_k", 0),
            min_p=body.number("min_p", 0.0),
            seed=body.integer("seed"),
            max_tokens=max_tokens,
            stop_token_ids=_token_ids(body, "stop_token_ids"),
            ignore_eos=body.boolean("ignore_eos"),
            logprobs=logprobs,
            skip_special_tokens=body.boolean("skip_special_tokens", True),
            stop=_strings(body, "stop"),
            include_stop_str_in_output=body.boolean("include_stop_str_in_output"),
            presence_penalty=body.number("presence_penalty", 0.0),
            frequency_penalty=body.number("frequency_penalty", 0.0),
            repetition_penalty=body.number("repetition_penalty", 1.0),
            logit_bias=_logit_bias(body),
            min_tokens=body.integer("min_tokens", 0),
            bad_words=_strings(body, "bad_words"),
            allowed_token_ids=_allowed_token_ids(body),
            structured_output=structured,
            prompt_logprobs=prompt_logprobs,
            cache_salt=body.string("cache_salt"),
        )
    except InvalidParameter as exc:
        raise _invalid(exc, names.get(exc.field, exc.field)) from None


def _token_ids(body: Body, key: str) -> tuple[int, ...]:
    value = body.raw(key)
    if value is not None and (
        not isinstance(value, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in value)
    ):
        raise invalid(f"'{key}' must be an array of non-negative integers", key, "invalid_type")
    return tuple(value or ())


def _allowed_token_ids(body: Body) -> tuple[int, ...]:
    """vLLM's allowed_token_ids; an empty list would allow nothing (vLLM refuses it too)."""
    ids = _token_ids(body, "allowed_token_ids")
    if body.raw("allowed_token_ids") == []:
        raise invalid("'allowed_token_ids' must not be empty", "allowed_token_ids", "invalid_value")
    return ids


def _logit_bias(body: Body) -> tuple[tuple[int, Any], ...]:
    """OpenAI's {"<token id>": bias} as (id, bias) pairs; the values are SamplingParams' to check."""
    value = body.raw("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid(f"'logit_bias' must be an object, got {kind_of(value)}", "logit_bias", "invalid_type")
    out: dict[int, Any] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias", "invalid_value")
        out[int(key)] = bias
    return tuple(out.items())


_STRUCTURED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
"""Where a request may ask for structured output: OpenAI's field, vLLM's current one and vLLM's
older guided_* ones; at most one of them."""


def structured_field(body: Body) -> str | None:
    """Which of _STRUCTURED_FIELDS the request gave (the first; _structured_output refuses two)."""
    return next((key for key in _STRUCTURED_FIELDS if body.has(key)), None)


def _structured_output(body: Body) -> tuple[StructuredOutput | None, str]:
    """The constraint from whichever of _STRUCTURED_FIELDS the request gave (at most one), and the
    field it came from (for error messages)."""
    given = [(key, body.raw(key)) for key in _STRUCTURED_FIELDS]
    given = [(key, v) for key, v in given if v is not None]
    if len(given) > 1:
        raise invalid(f"give at most one of {', '.join(k for k, _ in given)}", given[1][0])
    if not given:
        return None, "response_format"
    key, value = given[0]
    try:
        if key == "response_format":
            return _response_format(value), key
        if key == "structured_outputs":
            return _structured_outputs(value)
        return _guided(key, key.removeprefix("guided_"), value), key
    except InvalidParameter as exc:
        raise _invalid(exc, key) from None


def _guided(name: str, kind: str, value: Any) -> StructuredOutput:
    """One of vLLM's kinds of constraint (json, regex, choice, grammar) from the field ``name``."""
    if kind == "json":
        if not isinstance(value, (dict, str)):
            raise invalid(
                f"'{name}' must be an object or a string, got {kind_of(value)}", name, "invalid_type"
            )
        return StructuredOutput.json_schema(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise invalid(
                f"'{name}' must be a non-empty array of strings, got {kind_of(value)}", name, "invalid_type"
            )
        return StructuredOutput.choice(value)
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string, got {kind_of(value)}", name, "invalid_type")
    return StructuredOutput.regex(value) if kind == "regex" else StructuredOutput.lark(value)


def _structured_outputs(value: Any) -> tuple[StructuredOutput, str]:
    """vLLM's structured_outputs object: one of json, regex, choice, grammar, json_object."""
    if not isinstance(value, dict):
        raise invalid(
            f"'structured_outputs' must be an object, got {kind_of(value)}",
            "structured_outputs",
            "invalid_type",
        )
    spec = Body(value, "structured_outputs.")
    kinds = [(k, spec.raw(k)) for k in ("json", "regex", "choice", "grammar")]
    kinds = [(k, v) for k, v in kinds if v is not None]
    if spec.boolean("json_object"):
        kinds.append(("json_object", True))
    spec.boolean("disable_fallback")  # one grammar engine: nothing to fall back to
    spec.boolean("disable_any_whitespace")  # JSON is always compact here
    for unsupported_key in ("disable_additional_properties", "whitespace_pattern", "structural_tag"):
        spec.reject(unsupported_key, lambda v: v is False or v == "")
    spec.finish()
    if len(kinds) != 1:
        given = f"got {', '.join(k for k, _ in kinds)}" if kinds else "got none"
        raise invalid(
            f"'structured_outputs' must set exactly one of json, regex, choice, grammar, json_object; {given}",
            "structured_outputs",
        )
    kind, raw = kinds[0]
    name = spec.name(kind)
    return (StructuredOutput.json_object() if kind == "json_object" else _guided(name, kind, raw)), name


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise invalid(
            f"'response_format' must be an object, got {kind_of(value)}", "response_format", "invalid_type"
        )
    fmt = Body(value, "response_format.")
    kind = fmt.string("type")
    out: StructuredOutput | None
    if kind == "text":
        out = None
    elif kind == "json_object":
        out = StructuredOutput.json_object()
    elif kind == "json_schema":
        raw = fmt.raw("json_schema")
        if not isinstance(raw, dict):
            name = "response_format.json_schema"
            raise invalid(f"'{name}' must be an object with a 'schema', got {kind_of(raw)}", name)
        spec = Body(raw, "response_format.json_schema.")
        spec.string("name")
        spec.string("description")
        spec.boolean("strict")  # the schema is always enforced
        schema = spec.raw("schema")
        if not isinstance(schema, dict):
            name = spec.name("schema")
            raise invalid(f"'{name}' must be a JSON Schema object, got {kind_of(schema)}", name)
        spec.finish()
        out = StructuredOutput.json_schema(schema)
    else:
        raise invalid(
            f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
            "response_format.type",
        )
    fmt.finish()
    return out


def _strings(body: Body, key: str) -> tuple[str, ...]:
    """Absent, one string or an array of strings (SamplingParams checks each one)."""
    value = body.raw(key)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"'{key}' must be a string or an array of strings, got {kind_of(value)}", key)
    return tuple(items)


def _invalid(exc: InvalidParameter, param: str) -> GatewayError:
    return invalid(exc.message_for(param), param, "invalid_value")


# ---- out -----------------------------------------------------------------------------------------


def finish_reason_to_openai(reason: FinishReason | None) -> str | None:
    return reason.value if reason is not None else None


def usage_to_openai(usage: Usage, details: bool = True) -> dict[str, Any]:
    """OpenAI's usage object (the counts of a whole request: see OpenAIFormatter.usage); without
    ``details`` (a choice's usage so far, on every chunk of a stream) the three counts only."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    return out


def timings_to_openai(t: Timings) -> dict[str, float | int | bool]:
    """A choice's ``"timings"`` (seconds, to the microsecond, and the routing decision's inputs),
    sent when the client asks."""
    return {
        "gateway": round(t.gateway, 6),
        "queue": round(t.queue, 6),
        "prefill": round(t.prefill, 6),
        "transfer": round(t.transfer, 6),
        "decode": round(t.decode, 6),
        "transfer_bytes": t.transfer_bytes,
        "total": round(t.total, 6),
        "worker_call": round(t.worker_call, 6),
        "migrations": t.migrations,
        "remote_prefill": t.remote_prefill,
        "prompt_blocks": t.prompt_blocks,
        "routed_cached_blocks": t.routed_cached_blocks,
        "routed_ahead_tokens": t.routed_ahead_tokens,
    }


class TokenNames(Protocol):
    """How logprobs name a token: its text (ServedModel) or its id (TokenIdNames)."""

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> tuple[int, ...]: ...


class TokenIdNames:
    """vLLM's return_tokens_as_token_ids: a token is "token_id:<id>" in logprobs, so that one
    whose text is part of a character (byte-level BPE) can still be told apart."""

    def token_text(self, token_id: int) -> str:
        return f"token_id:{token_id}"

    def token_bytes(self, token_id: int) -> tuple[int, ...]:
        return tuple(self.token_text(token_id).encode())


def chat_logprobs_to_openai(entries: Sequence[TokenLogprobs], model: TokenNames) -> list[dict[str, Any]]:
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
    entries: Sequence[TokenLogprobs], model: TokenNames, offset: int
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


def echo_logprobs_to_openai(
    prompt: Sequence[int], entries: Sequence[TokenLogprobs], model: TokenNames
) -> dict[str, list[Any]]:
    """Completions' ``logprobs`` block of an echoed prompt: its first token has none (null), as
    OpenAI reports it; ``entries`` are those of tokens 1..; offsets count from the text's start."""
    first = model.token_text(prompt[0])
    block, _ = completion_logprobs_to_openai(entries, model, len(first))
    for key, value in (
        ("tokens", first),
        ("token_logprobs", None),
        ("top_logprobs", None),
        ("text_offset", 0),
    ):
        block[key].insert(0, value)
    return block


def prompt_logprobs_to_openai(
    entries: Sequence[TokenLogprobs], model: ServedModel
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (the first: null), token id -> {logprob, rank,
    decoded_token} for the prompt's token and its top alternatives (rank 1 is the most likely;
    null for a prompt token outside the alternatives)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for e in entries:
        ranked = {t: (i + 1, lp) for i, (t, lp) in enumerate(e.top)}
        rank = ranked.get(e.token_id, (None, 0.0))[0]
        table = {str(e.token_id): _vllm_logprob(e.logprob, rank, model.token_text(e.token_id))}
        for t, (r, lp) in ranked.items():
            table.setdefault(str(t), _vllm_logprob(lp, r, model.token_text(t)))
        out.append(table)
    return out


def _vllm_logprob(logprob: float, rank: int | None, text: str) -> dict[str, Any]:
    return {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}


def _finite(logprob: float) -> float:
    """Logprobs as OpenAI reports them: -9999.0 stands for -inf (JSON has no infinities)."""
    return logprob if logprob >= -9999.0 else -9999.0
