"""What a request produces, in wire-neutral types: finish reason, token logprobs, usage, timings.

The engine, the workers and the gateway all speak these; scalellm.types.proto converts them to and
from the wire, the gateway's OpenAI converter to and from OpenAI's JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(str, enum.Enum):
    """Why a request ended; the values are OpenAI's ``finish_reason`` strings (and compare equal
    to them)."""

    STOP = "stop"
    """An end-of-sequence token, a stop token id or (gateway) a stop string."""
    LENGTH = "length"
    """max_tokens or the model's context length was reached."""
    ABORT = "abort"
    """Cancelled: client disconnect, deadline, an explicit cancel or a failed engine step."""


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprobs of one generated token: the sampled one and the top-N alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one finished sequence."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from a prefix cache instead of being computed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    """Where a request's time went, in seconds. Workers fill queue .. transfer_bytes; the gateway
    adds its own share and what it saw of the worker's stream."""

    gateway: float = 0.0
    """In the gateway: validation, tokenization, routing, detokenization."""
    queue: float = 0.0
    """Waiting for KV blocks and a prefill slot."""
    prefill: float = 0.0
    """Computing the prompt, up to the first token."""
    transfer: float = 0.0
    """Moving the prompt's KV from the prefill worker to the decode worker (0 when colocated)."""
    decode: float = 0.0
    """From the first token to the last."""
    transfer_bytes: int = 0
    """Bytes of KV moved between workers."""
    total: float = 0.0
    """From the gateway receiving the request to the decode worker's last message."""
    worker_call: float = 0.0
    """The decode stream as the gateway saw it: opened to the worker's last message."""
    migrations: int = 0
    """Decode workers the request moved to after one failed mid-stream (set by the gateway)."""
    remote_prefill: bool = False
    """The gateway's routing sent the prompt to a prefill worker (False: the decode worker
    computed it). This and the three below are the routing decision's inputs, set by the gateway."""
    prompt_blocks: int = 0
    """Prompt blocks a prefix-cache hit could cover (prefix routing; 0 under load routing)."""
    routed_cached_blocks: int = 0
    """Of those, blocks routing found cached where the prompt was computed."""
    routed_ahead_tokens: int = 0
    """Tokens of work queued where the prompt was computed, as routing saw it."""
