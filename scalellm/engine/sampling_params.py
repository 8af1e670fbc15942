"""Per-request sampling parameters, validated when they are made.

Shaped like vLLM's ``SamplingParams`` so its users feel at home. Every bad value raises a
``ValueError`` that names the field, so the services can turn it into INVALID_ARGUMENT / HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The sampler keeps at most this many top logprobs per token (OpenAI allows 20).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1].
    min_p: drop tokens whose probability is below min_p times the top token's, in [0, 1].
    seed: a per-request seed; the same seed gives the same tokens whatever else is in the batch.
    max_tokens: how many tokens to generate at most (None: up to the model's context length).
    stop_token_ids: extra token ids that end the request (the model's EOS always does, unless
        ignore_eos).
    ignore_eos: keep generating past EOS (benchmarks).
    logprobs: how many top logprobs to return per generated token (None: none; 0: only the
        sampled token's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples (the object is frozen and hashable).
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.n, int) or self.n != 1:
            raise ValueError(f"n must be 1 in the engine (got {self.n!r}); the gateway fans out n > 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(
                f"top_k must be 0 (disabled), -1 (disabled) or a positive integer, got {self.top_k!r}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)!r}"
            )
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1
