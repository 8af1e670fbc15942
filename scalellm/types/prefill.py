"""What a decode worker and a prefill worker exchange for one disaggregated prompt.

decode worker: PrefillTarget (whom to ask) + KVDestination (where the KV lands) ──Prefill──▶
prefill worker: ◀── PrefillResult (first token, its logprobs, cache hits, timings)
"""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.types.outputs import TokenLogprobs


@dataclass(frozen=True, slots=True)
class PrefillTarget:
    """A prefill worker a decode worker may ask for a prompt's KV."""

    worker_id: str
    address: str
    """Its gRPC host:port."""


@dataclass(frozen=True, slots=True)
class KVDestination:
    """Where a prompt's KV goes: the decode worker's reserved blocks for prompt blocks
    ``skip_blocks ..`` (it holds the first ``skip_blocks`` already, from its own prefix cache).
    Block ``skip_blocks + i`` of the prompt lands in ``block_ids[i]``."""

    decode_worker_id: str
    transfer_endpoint: str
    """host:port of the decode worker's transfer rendezvous."""
    transfer_id: int
    """Names this transfer on the pair channel."""
    skip_blocks: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A prefill worker's answer once the KV has been sent."""

    first_token_id: int
    logprobs: TokenLogprobs | None
    cached_tokens: int
    """Prompt tokens served from the prefill worker's prefix cache."""
    queue_seconds: float
    prefill_seconds: float
    transfer_seconds: float
    transfer_bytes: int
