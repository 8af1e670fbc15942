"""SamplingParams: how to generate for one request, validated once, when it is made.

Shaped like vLLM's ``SamplingParams``. Torch-free: the gateway builds it from an OpenAI body or
its gRPC request, the workers from their proto (scalellm.types.proto), the engine and the offline
``LLM`` take it as it is. A bad value raises :class:`InvalidParameter` (a ``ValueError``) naming
the field, which each boundary reports under its own name for that field (INVALID_ARGUMENT, or
HTTP 400 with an OpenAI error body).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_LOGPROBS = 20
"""Most top logprobs per token (OpenAI's limit)."""
MAX_STOP_CHARS = 1024
"""Longest stop string."""


class InvalidParameter(ValueError):
    """A bad value of one field: the message is ``'<field>' <problem>``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"'{field}' {problem}")
        self.field = field
        self.problem = problem

    def message_for(self, param: str) -> str:
        """The message with the field under a boundary's own name ("sampling.top_p", ...)."""
        return f"'{param}' {self.problem}"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    n: how many choices to generate (the gateway fans them out; the engine runs one per request).
    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_p: keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1].
    top_k: keep the k most likely tokens (0 or -1: all).
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
    include_stop_str_in_output: keep the matched stop string at the end of the text.
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

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples (the object is frozen and hashable).
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check_stop(stop)
        object.__setattr__(self, "stop", tuple(dict.fromkeys(stop)))
        if self.top_k == -1:
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

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
