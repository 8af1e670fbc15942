"""A request's state inside the engine, and the status enum that drives the scheduler.

add_request          schedule()             remote KV landed
    |                    |                        |
    v                    v                        v
 WAITING ----------> RUNNING -----------> FINISHED_{STOPPED,LENGTH,ABORTED}
    ^                  |   ^
    |    blocks ran out|   |  (decode worker) KV pushed by a prefill worker
    +---- PREEMPTED <--+   +--------- WAITING_FOR_REMOTE_KVS
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scalellm.types import DEFAULT_TENANT, FinishReason, SamplingParams, TenantShare, TokenLogprobs

if TYPE_CHECKING:
    from scalellm.engine.grammar import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    """Queued here for (re)computing its prompt."""
    WAITING_FOR_REMOTE_KVS = enum.auto()
    """Blocks reserved on a decode worker; a prefill worker is computing and pushing the KV."""
    RUNNING = enum.auto()
    """In the continuous batch: prefilling in chunks or decoding."""
    PREEMPTED = enum.auto()
    """Blocks taken back under memory pressure; it will be recomputed from its tokens."""
    FINISHED_STOPPED = enum.auto()
    """Sampled EOS or one of its stop token ids."""
    FINISHED_LENGTH = enum.auto()
    """Reached max_tokens or the model's context length."""
    FINISHED_ABORTED = enum.auto()
    """Cancelled by the caller."""

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why it finished; None while unfinished."""
        return _FINISH_REASON.get(self)


PENDING_TOKEN = -1
"""Stands in token_ids for a token sampled by a step still running on the device (async
scheduling): the next step feeds it on the device, the engine fills it in when the step's results
arrive."""

_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    ``token_ids`` holds the prompt followed by the tokens generated so far. The KV cache holds
    the first ``num_computed_tokens`` of them, in the slots of ``block_ids``:

        token_ids:  p0 p1 p2 p3 p4 p5 | o0 o1
                    <-- computed ---->  ^ next to feed (decode: exactly one token)
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    """Effective output limit: max_tokens capped by the model's context length."""
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    """Lower runs first (as in vLLM); ties go to the earlier arrival."""
    arrival_time: float = field(default_factory=time.monotonic)
    tenant: TenantShare = DEFAULT_TENANT
    """Whose it is: the scheduler's waiting queue is fair across tenants by weight (priority and
    arrival order within one)."""

    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at admission."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Hash chain over the full blocks of token_ids (see BlockManager)."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """With sampling_params.prompt_logprobs: those of prompt tokens 1.. computed so far (entry i
    is token i + 1's, from the logits at position i)."""
    scheduled_time: float | None = None
    """When it was first admitted to the running batch (queue time ends here)."""
    first_token_time: float | None = None
    num_preemptions: int = 0
    keep_blocks: bool = False
    """Prefill worker: the blocks outlive the finish until their KV has been sent; the owner
    then calls Scheduler.release()."""
    resumed_tokens: int = 0
    """Output tokens another worker generated before this one took the request over (migration)."""
    grammar: GrammarMatcher | None = None
    """Structured output: where the output stands in its grammar. Every appended token advances
    it, so a request continued on a decode worker catches up by appending the first token."""
    awaiting_token: bool = False
    """token_ids ends with PENDING_TOKEN: a token sampled in the step still running (async
    scheduling). At most one: the engine keeps one step in flight."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Speculative decoding: tokens guessed to follow token_ids (engine/speculative.py), set
    before each step; the scheduler feeds them with the request's last token, budget allowing."""

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: priority first, then arrival (FCFS)."""
        return (self.priority, self.arrival_time)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def append_pending(self) -> None:
        """A step that samples for this request was launched; its token is not known yet."""
        assert not self.awaiting_token, "one pending token at a time"
        self.token_ids.append(PENDING_TOKEN)
        self.awaiting_token = True

    def fill_pending(self, token_id: int) -> None:
        """The launched step's token arrived: it takes the placeholder's place, as append_token
        takes a token."""
        assert self.awaiting_token
        self.drop_pending()
        self.append_token(token_id)

    def drop_pending(self) -> None:
        """Forget the pending token (the request ended before it arrived)."""
        if self.awaiting_token:
            self.token_ids.pop()
            self.awaiting_token = False

    def resume(self, token_ids: Sequence[int]) -> None:
        """Continue a request another worker began: its output so far is taken as given (the
        grammar advanced through it, first_token_time left for this worker's first own token) and
        computed again with the prompt, like a preempted request's. ``resumed_tokens`` counts it."""
        for token_id in token_ids:
            self.token_ids.append(token_id)
            if self.grammar is not None:
                self.grammar.accept(token_id)
        self.resumed_tokens += len(token_ids)

    def check_stop(self) -> RequestStatus | None:
        """After a token was appended: the finished status it leads to, if any."""
        if self.sampling_params.stops_on(self.token_ids[-1], self.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if self.grammar is not None and self.grammar.done:
            return RequestStatus.FINISHED_STOPPED  # complete: only the end could follow
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
