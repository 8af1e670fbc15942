"""SamplingParams: how to generate for one request, validated once, when it is made.

Shaped like vLLM's ``SamplingParams``. Torch-free: the gateway builds it from an OpenAI body or
its gRPC request, the workers from their proto (scalellm.types.proto), the engine and the offline
``LLM`` take it as it is. A bad value raises :class:`InvalidParameter` (a ``ValueError``) naming
the field, which each boundary reports under its own name for that field (INVALID_ARGUMENT, or
HTTP 400 with an OpenAI error body).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scalellm.types.errors import InvalidParameter
from scalellm.types.structured import StructuredOutput

MAX_LOGPROBS = 20
"""Most top logprobs per token (OpenAI's limit)."""
MAX_STOP_CHARS = 1024
"""Longest stop string."""
MAX_LOGIT_BIAS = 100.0
"""logit_bias values lie in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI's range)."""
MAX_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)."""
ALL_TOKENS = 2**31
"""A top_k this large keeps every token of any vocabulary, as 0 does, and is stored as 0 (the
wire's top_k is an int32)."""
GREEDY_BELOW = 1e-5
"""A temperature under this samples greedily, as vLLM's does: dividing logits by it would
overflow float32 (1e-46 is 0 there), and the distribution is argmax's to float32 precision."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    n: how many choices to generate (the gateway fans them out; the engine runs one per request).
    temperature: 0 (or under GREEDY_BELOW) means greedy; otherwise logits are divided by it before sampling.
    top_p: keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1].
    top_k: keep the k most likely tokens (0 or -1: all; so does a k of ALL_TOKENS or more).
    min_p: drop tokens whose probability is below min_p times the top token's, in [0, 1].
    seed: a per-request seed; the same seed gives the same tokens whatever else is in the batch.
    max_tokens: how many tokens to generate at most (None: up to the model's context length).
    stop_token_ids: extra token ids that end the request (the model's EOS always does, unless
        ignore_eos).
    ignore_eos: keep generating past EOS (benchmarks).
    logprobs: how many top logprobs to return per generated token (None: none; 0: only the
        sampled token's).
    skip_special_tokens: leave special tokens out of the text.
    stop: strings that end the output (applied to the text by the gateway and the offline LLM;
        duplicates dropped).
    include_stop_str_in_output: keep the matched stop string at the end of the text (and the
        text of the token that stopped the output: EOS, or one of stop_token_ids).
    presence_penalty: subtract this from the logit of every token already generated, in [-2, 2].
    frequency_penalty: subtract this times the token's count in the output so far, in [-2, 2].
    repetition_penalty: > 0; a token seen in the prompt or the output has its logit divided by it
        when positive, multiplied when negative (1: off).
    logit_bias: (token id, bias) pairs added to the logits before sampling, bias in [-100, 100]
        (a mapping is accepted and stored as pairs sorted by id).
    min_tokens: end-of-sequence and stop token ids cannot be sampled before this many tokens.
    bad_words: strings never to generate (text: the gateway or the offline API turns them into
        bad_words_token_ids with the tokenizer; the engine takes only the ids).
    bad_words_token_ids: token sequences never to generate: the last token of a sequence is banned
        whenever the output ends with the rest of it (a one-token sequence: always banned).
    allowed_token_ids: vLLM's: only these token ids may be generated (empty: any). EOS is not
        added: a list without it runs to max_tokens (or a stop token id in the list).
    structured_output: a JSON / JSON Schema / regex / Lark constraint on the whole output (not with
        ignore_eos or min_tokens: the grammar decides where the output ends).
    prompt_logprobs: how many top logprobs to return per prompt token, computed at prefill (None:
        none; 0: only each prompt token's own). The first prompt token has none.
    cache_salt: vLLM's: the prompt's prefix-cache blocks are shared only with requests of the same
        salt (None: with requests without one). A tenant's secret keeps others from timing or
        reusing its cached prompts; 1..1024 characters.

    The penalties and controls act in vLLM's order on the logits: allowed_token_ids and
    structured output masks, bad words, min_tokens, logit_bias, then repetition, frequency and presence penalties; greedy
    requests take the argmax of the result. Reported logprobs stay those of the raw logits.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    structured_output: StructuredOutput | None = None
    prompt_logprobs: int | None = None
    cache_salt: str | None = None
    uses_logits_controls: bool = field(init=False, repr=False, compare=False)
    """Whether any control beyond temperature / top-k / top-p / min-p touches the logits (set
    when made: the sampler's fast path for requests that use none)."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples (the object is frozen and hashable).
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "bad_words", _strings("bad_words", self.bad_words))
        object.__setattr__(self, "bad_words_token_ids", _sequences(self.bad_words_token_ids))
        object.__setattr__(self, "allowed_token_ids", _token_set("allowed_token_ids", self.allowed_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check_stop(stop)
        object.__setattr__(self, "stop", tuple(dict.fromkeys(stop)))
        if self.top_k == -1 or (_is_int(self.top_k) and self.top_k >= ALL_TOKENS):
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check("n", _is_int(self.n) and self.n >= 1, "must be >= 1", self.n)
        _check("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]", self.temperature)
        _check("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]", self.top_p)
        _check("top_k", _is_int(self.top_k) and self.top_k >= 0, "must be >= -1", self.top_k)
        _check("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]", self.min_p)
        _check(
            "seed",
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            "must be an integer in [0, 2**63)",
            self.seed,
        )
        _check(
            "max_tokens",
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "must be >= 1",
            self.max_tokens,
        )
        _check(
            "stop_token_ids",
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "must be non-negative integers",
            list(self.stop_token_ids),
        )
        _check(
            "logprobs",
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"must be in [0, {MAX_LOGPROBS}]",
            self.logprobs,
        )
        _check(
            "prompt_logprobs",
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            f"must be in [0, {MAX_LOGPROBS}]",
            self.prompt_logprobs,
        )
        _check(
            "cache_salt",
            self.cache_salt is None
            or (isinstance(self.cache_salt, str) and 1 <= len(self.cache_salt) <= 1024),
            "must be a string of 1 to 1024 characters",
            self.cache_salt,
        )
        self._validate_controls()
        uses = (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
            or self.min_tokens > 0
            or bool(self.bad_words_token_ids)
            or bool(self.allowed_token_ids)
            or self.structured_output is not None
        )
        object.__setattr__(self, "uses_logits_controls", uses)

    def _validate_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            ok = _is_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY
            _check(name, ok, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]", value)
        rp = self.repetition_penalty
        _check("repetition_penalty", _is_number(rp) and 0.0 < rp < math.inf, "must be > 0", rp)
        _check(
            "min_tokens", _is_int(self.min_tokens) and self.min_tokens >= 0, "must be >= 0", self.min_tokens
        )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens", f"must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        so = self.structured_output
        if so is not None and not isinstance(so, StructuredOutput):
            raise InvalidParameter("structured_output", f"must be a StructuredOutput, got {so!r}")
        if so is not None and (self.ignore_eos or self.min_tokens):
            raise InvalidParameter(
                "structured_output",
                "cannot be combined with ignore_eos or min_tokens (the grammar decides where the output ends)",
            )

    def check_vocabulary(self, vocab_size: int) -> None:
        """Every token id of the controls is below ``vocab_size`` (which a SamplingParams cannot
        know when made); InvalidParameter naming the field otherwise."""
        for field_name, ids in (
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("bad_words_token_ids", [t for seq in self.bad_words_token_ids for t in seq]),
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids),
        ):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise InvalidParameter(
                    field_name, f"has token id {bad}, outside the vocabulary [0, {vocab_size})"
                )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: top_k 1, or a temperature under GREEDY_BELOW."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def stops_on(self, token_id: int, eos_token_ids: Collection[int]) -> bool:
        """Whether token_id ends the output: an EOS (unless ignore_eos) or one of stop_token_ids."""
        return (not self.ignore_eos and token_id in eos_token_ids) or token_id in self.stop_token_ids

    def shown_ids(self, ids: Sequence[int], stopped: bool, eos_token_ids: Collection[int]) -> Sequence[int]:
        """The output ids whose text is shown, as vLLM shows it: all but a last token that stopped
        the output (stopped: it ended with finish reason stop), unless include_stop_str_in_output.
        That token stays in the token ids; its text (EOS when special tokens are kept, or an
        ordinary token given in stop_token_ids) is left out."""
        if stopped and ids and not self.include_stop_str_in_output and self.stops_on(ids[-1], eos_token_ids):
            return ids[:-1]
        return ids


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """A mapping or pairs -> pairs sorted by token id, each checked."""
    pairs = value.items() if isinstance(value, Mapping) else value
    if not isinstance(pairs, Iterable) or isinstance(pairs, (str, bytes)):
        raise InvalidParameter("logit_bias", f"must map token ids to numbers, got {value!r}")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidParameter("logit_bias", f"must map token ids to numbers, got {pair!r}")
        token, bias = pair
        if not _is_int(token) or token < 0:
            raise InvalidParameter("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
        if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidParameter(
                "logit_bias", f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"
            )
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _strings(name: str, value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise InvalidParameter(name, f"must be a list of strings, got {value!r}")
    out = tuple(items)
    for s in out:
        if not isinstance(s, str) or not s:
            raise InvalidParameter(name, f"must be non-empty strings, got {s!r}")
    return out


def _sequences(value: object) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, Iterable):
        raise InvalidParameter("bad_words_token_ids", f"must be a list of token id lists, got {value!r}")
    out = []
    for seq in value:
        ids = tuple(seq) if isinstance(seq, Iterable) else ()
        if not ids or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidParameter(
                "bad_words_token_ids", f"must be non-empty lists of token ids (integers >= 0), got {seq!r}"
            )
        out.append(ids)
    return tuple(dict.fromkeys(out))


def _token_set(name: str, value: object) -> tuple[int, ...]:
    """Token ids -> sorted, without repeats (the order and repeats change nothing)."""
    ids = tuple(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else None
    if ids is None or not all(_is_int(t) and t >= 0 for t in ids):
        raise InvalidParameter(name, f"must be token ids (integers >= 0), got {value!r}")
    return tuple(sorted(set(ids)))


def _check(field: str, ok: bool, rule: str, value: object) -> None:
    if not ok:
        shown = format(value, "g") if isinstance(value, float) else repr(value)
        raise InvalidParameter(field, f"{rule}, got {shown}")


def _check_stop(stop: Iterable[object]) -> None:
    for s in stop:
        if not isinstance(s, str):
            raise InvalidParameter("stop", f"must be strings, got {s!r}")
        if not s:
            raise InvalidParameter("stop", "strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidParameter("stop", f"strings must be at most {MAX_STOP_CHARS} characters")
