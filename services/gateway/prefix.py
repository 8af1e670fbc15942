"""Prefix-aware routing: where a prompt's KV already lives, weighed against load, in tokens of work.

Every cost is counted in prompt tokens a worker must compute before our first token comes out:

    cost(w) = uncached(w) + ahead(w)
    uncached(w) = prompt_len - block_size * matched_blocks(w)      prefill work for our prompt
    ahead(w)    = backlog(w) + queue_weight * queued(w)             work queued in front of it
                  backlog: prompt tokens waiting / in prefill there: its last load report less
                           the whole prompts of ours it may count (a waiting request's cache hit is
                           only found on admission), plus our uncached tokens until their first token
                  queued:  running + waiting sequences (report + this gateway's in-flight since)

``queue_weight`` (``--queue-weight-tokens``, default 128) plays Dynamo's ``overlap_score_weight``
the other way round: it says how many prompt tokens one queued sequence is worth. With a
1000-token cached prefix a worker keeps winning until it runs ~8 more sequences than the others;
a worker that is overloaded loses the prefix's traffic. Decode workers are ranked by cost (a
worker without KV room for the prompt still comes last); prefill workers by the same cost.

Local or remote prefill (adaptive disaggregation), for the chosen decode worker d and the
cheapest prefill worker p:

    local  if uncached(d) <= local_prefill_tokens      short or mostly cached here
           or cost(d) < cost(p)                        the prefill tier is further behind
                                                       than d (its decodes counted in ahead(d))

``local_prefill_tokens`` (``--local-prefill-tokens``, default 256) is about one decode step's
prompt-chunk budget (the engine's ``prefill_tokens_with_decodes``), so a local prefill rides
along the running decodes instead of stalling them. With no prefill worker, prefill is local.

Where a prompt's blocks are: the registry's per-worker index (``scalellm.registry.BlockIndex``,
fed by the workers' published hash deltas), plus what this gateway routed in the last
``prediction_ttl_s`` seconds (a prompt just sent to a worker will be cached there before its
worker's next report arrives; the prediction expires on its own if it was wrong).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scalellm.kvhash import prompt_block_hashes
from scalellm.registry import BlockIndex


class RoutingMode(enum.Enum):
    """``prefix``: cost model above; ``load``: least loaded, as before prefix routing."""

    PREFIX = "prefix"
    LOAD = "load"

    @classmethod
    def parse(cls, text: str) -> RoutingMode:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"unknown routing {text!r} (expected prefix or load)") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingPolicy:
    """The cost model's knobs (see the module docstring)."""

    mode: RoutingMode = RoutingMode.PREFIX
    queue_weight_tokens: int = 128
    local_prefill_tokens: int = 256
    prediction_ttl_s: float = 10.0

    def __post_init__(self) -> None:
        if self.queue_weight_tokens < 0 or self.local_prefill_tokens < 0 or self.prediction_ttl_s < 0:
            raise ValueError("queue_weight_tokens, local_prefill_tokens and prediction_ttl_s must be >= 0")


class PrefixHashes:
    """A prompt's block-hash chains, computed once per block size."""

    __slots__ = ("_by_size", "_prompt", "_salt")

    def __init__(self, prompt: Sequence[int], cache_salt: str | None = None) -> None:
        self._prompt = prompt
        self._salt = cache_salt
        self._by_size: dict[int, tuple[int, ...]] = {}

    def of(self, block_size: int) -> tuple[int, ...]:
        chain = self._by_size.get(block_size)
        if chain is None:
            chain = self._by_size[block_size] = tuple(
                prompt_block_hashes(self._prompt, block_size, self._salt)
            )
        return chain


class PrefixIndex:
    """Matched prefix blocks per worker: the registry's published index or this gateway's own
    recent routes (predictions, dropped after ``ttl_s``)."""

    _MAX_PREDICTED = 200_000  # hashes per worker; older predictions go first past it

    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._predicted: dict[str, dict[int, float]] = {}

    def matched_blocks(self, published: BlockIndex | None, worker_id: str, chain: Sequence[int]) -> int:
        """Leading blocks of the chain the worker holds (published) or was just sent (predicted)."""
        predicted = self._predicted.get(worker_id)
        if not predicted:
            return published.matched_blocks(worker_id, chain) if published is not None else 0
        now = self._clock()
        n = 0
        for h in chain:
            if not ((published is not None and published.holds(worker_id, h)) or predicted.get(h, 0.0) > now):
                break
            n += 1
        return n

    def predict(self, worker_id: str, chain: Sequence[int]) -> None:
        """The worker is about to compute (or receive) these blocks."""
        if not chain or self._ttl_s <= 0:
            return
        predicted = self._predicted.setdefault(worker_id, {})
        expiry = self._clock() + self._ttl_s
        for h in chain:
            predicted.pop(h, None)  # re-insert: dicts keep insertion order, oldest first
            predicted[h] = expiry
        if len(predicted) > self._MAX_PREDICTED:
            self._expire(predicted)

    def _expire(self, predicted: dict[int, float]) -> None:
        now = self._clock()
        for h in [h for h, t in predicted.items() if t <= now]:
            del predicted[h]
        while len(predicted) > self._MAX_PREDICTED:
            del predicted[next(iter(predicted))]

    def forget(self, live: set[str]) -> None:
        """Drop predictions for workers that are gone."""
        for worker_id in [w for w in self._predicted if w not in live]:
            del self._predicted[worker_id]


def prefill_locally(
    policy: RoutingPolicy, *, uncached_decode: int, decode_cost: int, prefill_cost: int | None
) -> bool:
    """The adaptive-disaggregation rule (module docstring); prefill_cost None: no prefill worker."""
    if prefill_cost is None or uncached_decode <= policy.local_prefill_tokens:
        return True
    return decode_cost < prefill_cost
