"""What the engine tells its callers: each step's TokenEvents (the last one of a request with its
FinishedRequest), a reservation for remote KV, and its load. Callers read these, never a Request."""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.engine.request import Request, RequestStatus
from scalellm.types import FinishReason, TokenLogprobs, Usage


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """What a request reports when it finishes (times are time.monotonic())."""

    status: RequestStatus
    """One of the FINISHED_* statuses."""
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    """Prompt tokens whose KV was not computed here (prefix-cache hits, or the prefill worker's
    count for a request whose KV was pushed to this engine)."""
    arrival_time: float
    scheduled_time: float | None
    """When it first joined the running batch (None: never did, e.g. KV pushed by a prefill worker)."""
    first_token_time: float | None
    resumed_tokens: int = 0
    """Output tokens generated elsewhere before this engine took the request over (migration)."""
    kept_block_ids: tuple[int, ...] = ()
    """A prefill-only request's blocks, held (and unchanged) until ``release()``."""

    @property
    def finish_reason(self) -> FinishReason:
        reason = self.status.finish_reason
        assert reason is not None, "a FinishedRequest has a finished status"
        return reason

    @property
    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step's news for one request: a new token, and on its last event how it finished."""

    request: Request
    """The engine's request object (identity only: callers read the fields below)."""
    token_id: int | None
    """None for a request that finished without a new token (aborted)."""
    logprobs: TokenLogprobs | None
    outcome: FinishedRequest | None = None
    """Set on the request's last event."""
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    """With sampling_params.prompt_logprobs, on the event of the first token: those of prompt
    tokens 1.. (the first prompt token has none)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from the request's arrival at this engine to its first token (None before it
        has one; a decode worker's first token is the prefill worker's, landed with its KV). Set
        once, so any thread may read it."""
        req = self.request
        return None if req.first_token_time is None else req.first_token_time - req.arrival_time


@dataclass(frozen=True, slots=True)
class RemoteReservation:
    """Blocks reserved for a prompt whose KV a prefill worker will push: the first
    ``skip_blocks`` hold this engine's own prefix-cache hits, ``block_ids`` take the rest."""

    skip_blocks: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's load at one moment, for metrics and registry heartbeats."""

    num_running: int
    """In the running batch, plus those whose KV a prefill worker is pushing."""
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefill_backlog_tokens: int
    """Tokens to compute before the waiting requests and those still in prefill decode (the
    planner's signal for the prefill tier)."""


def outcome(req: Request) -> FinishedRequest:
    """The finished request's report (built on the step thread, read anywhere)."""
    assert req.status.finished, "only finished requests have an outcome"
    return FinishedRequest(
        status=req.status,
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=req.num_output_tokens,
        num_cached_tokens=req.num_cached_tokens,
        arrival_time=req.arrival_time,
        scheduled_time=req.scheduled_time,
        first_token_time=req.first_token_time,
        resumed_tokens=req.resumed_tokens,
        kept_block_ids=tuple(req.block_ids) if req.keep_blocks else (),
    )
