"""Continuous batching with chunked prefill under a per-step token budget.

Each ``schedule()`` builds one step's batch:

    budget = max_num_batched_tokens
    prefill budget = prefill_tokens_with_decodes while any running request decodes, else budget
    1. running requests, highest priority first: one token each when decoding, the next chunk
       of the prompt when prefilling (within both budgets); if a request needs a block and none
       is free, the running request with the lowest priority (latest arrival among equals) is
       preempted: its blocks are freed and it goes back to the waiting queue to be recomputed.
    2. waiting requests while both budgets, sequence slots and blocks last: blocks for the whole
       prompt are allocated on admission (prefix-cache hits are shared), then its first chunk is
       scheduled. Nothing is admitted in a step that preempted for memory. Which waiting request
       goes next: the first (priority, then FCFS) of a tenant under its share of the slots
       (step 0) if any, else of the tenant whose turn it is, by weight
       (scalellm.types.fairness: start-time fair queuing, one request a turn), so one tenant's
       flood cannot hold the others back; with one tenant it is simply the first in line.
    0. (before 1) the slots are shared fairly too. A tenant's share is max_num_seqs x its weight
       / the weights of the tenants with work here. When every slot is taken and a waiting
       tenant runs fewer requests than its share while another runs more, the newest,
       lowest-priority request of the tenant furthest over its share is preempted (recomputed
       later, as under memory pressure) and in 2. a tenant under its share goes first, so the
       freed slot is its in this step. A flood that filled the batch before another tenant
       arrived would otherwise keep every slot until its requests end. Never with one tenant.

           slots 16, flood running 16, victim arrives:  flood 16 > share 8, victim 0 < 8
           -> preempt flood's newest, admit the victim's request now

    3. (speculative decoding) what is left of the budget, up to max_rows_with_drafts decode rows
       in all, goes to draft tokens of requests about to sample (Request.draft_token_ids,
       engine/speculative.py), in the same order, as long as blocks stay free for every running
       request to grow.

Decode latency: a step costs roughly its token count, so one 2048-token prefill step stalls
every running stream for seconds on a CPU (an inter-token latency p99 of 5 s at 64 streams,
docs/serving_benchmark.md). While anything decodes, prompts therefore advance by at most
``prefill_tokens_with_decodes`` tokens a step, riding along the decode steps that run anyway; a
burst with nothing decoding yet still fills the whole budget.

``update()`` applies the step's sampled tokens: requests whose computed tokens reached the end
of their sequence get the new token, and finished ones free their blocks. With async scheduling
the engine splits it: ``advance()`` when a step is launched (each sampling request then holds a
pending token, so the next ``schedule()`` sees it decoding), ``add_tokens()`` once the tokens
arrive, after the next step was scheduled and its forward pass launched.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request, RequestStatus
from scalellm.types import FairShares


def prefill_backlog_tokens(waiting: Iterable[Request], running: Iterable[Request]) -> int:
    """Tokens still to compute before these requests decode: all of a waiting request's tokens
    not yet computed (a preempted one recomputes its output too), and the rest of the prompt of a
    running request still in prefill."""
    queued = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
    partial = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in running)
    return queued + partial


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests in the running batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens plus prefill chunks)."""
    watermark_blocks: int = 0
    """Blocks that admission leaves free so running requests can grow without preemption."""
    prefill_tokens_with_decodes: int = 256
    """Most prompt tokens in a step while any running request decodes (protects decode latency)."""
    max_rows_with_drafts: int = 0
    """Speculative decoding: draft tokens join a step only while its decode rows (one per
    decoding request, one per draft) stay within this many (0: no drafts)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.prefill_tokens_with_decodes < 1:
            raise ValueError(
                "max_num_seqs, max_num_batched_tokens, prefill_tokens_with_decodes must be positive"
            )


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens fed this step, starting at request.num_computed_tokens (draft tokens included)."""
    num_draft_tokens: int = 0
    """Of those, the last ones are the first num_draft_tokens of request.draft_token_ids
    (speculative decoding: the step samples a token after each of them too)."""

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so a token is sampled."""
        fed = self.num_new_tokens - self.num_draft_tokens
        return self.request.num_computed_tokens + fed == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: list[Request] = []
        """Sorted by Request.sort_key."""
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}
        """Requests in WAITING_FOR_REMOTE_KVS, by id."""
        self.finished: list[Request] = []
        """Finished since the last take_finished(), blocks already freed."""
        self._shares = FairShares()

    # ---- admission -----------------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self._enqueue(req)

    def reserve_remote(self, req: Request) -> bool:
        """Decode worker: reserve blocks for the whole prompt before asking a prefill worker for
        its KV. False (nothing changed) when the blocks are not free right now; never
        over-commits. Blocks found in our own prefix cache come first in ``req.block_ids`` and
        ``req.num_cached_tokens`` counts them: only the rest needs to travel."""
        if not self.blocks.allocate(req, req.num_tokens, reserve=0):
            return False
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.remote[req.request_id] = req
        return True

    def remote_kv_ready(self, request_id: str, first_token: int) -> Request:
        """Decode worker: the prompt's KV has landed and the prefill worker sampled
        ``first_token``; the request joins the running batch at its next step (or, aborted by
        abort_all() meanwhile, frees its blocks)."""
        req = self.remote.pop(request_id)
        if req.status is RequestStatus.FINISHED_ABORTED:  # by abort_all(): its blocks are safe now
            self.blocks.free_request(req)
            return req
        req.num_computed_tokens = req.num_tokens
        self.blocks.commit_computed_blocks(req)
        req.append_token(first_token)
        stop = req.check_stop()
        if stop is not None:
            self._finish(req, stop)
        else:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks. None if unknown or finished."""
        for queue in (self.waiting, self.running):
            for i, req in enumerate(queue):
                if req.request_id == request_id:
                    del queue[i]
                    self._finish(req, RequestStatus.FINISHED_ABORTED)
                    return req
        remote = self.remote.pop(request_id, None)
        if remote is not None:
            self._finish(remote, RequestStatus.FINISHED_ABORTED)
        return remote

    def abort_all(self) -> list[Request]:
        """Abort every unfinished request and return them. Waiting and running ones free their
        blocks now; those waiting for remote KV keep theirs (a transfer may still be writing
        into them) until remote_kv_ready() or abort() settles them."""
        reqs = [*self.running, *self.waiting]
        self.running, self.waiting = [], []
        for req in reqs:
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        for req in self.remote.values():
            if req.status is RequestStatus.WAITING_FOR_REMOTE_KVS:
                req.status = RequestStatus.FINISHED_ABORTED
                reqs.append(req)
        return reqs

    # ---- one step ------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def prefill_backlog_tokens(self) -> int:
        return prefill_backlog_tokens(self.waiting, self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decoding = any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        prefill_budget = min(budget, self.config.prefill_tokens_with_decodes) if decoding else budget
        self.running.sort(key=lambda r: r.sort_key)
        chosen: dict[str, ScheduledRequest] = {}
        fair = SchedulerOutput()
        self._share_full_batch(fair)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.awaiting_token and req.num_output_tokens >= req.max_tokens:
                i += 1  # async scheduling: its pending token is its last
                continue
            left = req.num_tokens - req.num_computed_tokens
            n = min(left, budget, prefill_budget if left > 1 else 1)
            if n < 1:
                i += 1  # a prompt waiting for the next step's prefill budget
                continue
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority, latest arrival
                given_back = self._preempt(victim, chosen, out)
                budget += given_back
                prefill_budget += given_back if given_back > 1 else 0
                if victim is req:
                    break
            else:
                chosen[req.request_id] = ScheduledRequest(req, n)
                budget -= n
                prefill_budget -= n if left > 1 else 0
                i += 1

        while (
            self.waiting
            and min(budget, prefill_budget) > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            index = self._next_waiting()
            req = self.waiting[index]
            if req.awaiting_token:  # preempted before its pending token arrived: not yet
                break
            if not self.blocks.allocate(req, req.num_tokens, reserve=self.config.watermark_blocks):
                break
            del self.waiting[index]
            req.status = RequestStatus.RUNNING
            if req.scheduled_time is None:  # first admission (a preempted one had its turn)
                req.scheduled_time = time.monotonic()
                self._shares.charge(req.tenant)
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget, prefill_budget)
            chosen[req.request_id] = ScheduledRequest(req, n)
            budget -= n
            prefill_budget -= n

        if self.config.max_rows_with_drafts:
            self._add_drafts(chosen, budget)
        out.scheduled = list(chosen.values())
        out.preempted[:0] = fair.preempted
        return out

    def _add_drafts(self, chosen: dict[str, ScheduledRequest], budget: int) -> None:
        """3. (speculative decoding) Draft tokens ride on what is left of the step once every
        running and admitted request has its tokens: a request about to sample its next token
        feeds its ``draft_token_ids`` too, budget, rows and blocks allowing (never a preemption)."""
        rows = sum(1 for s in chosen.values() if s.num_new_tokens == 1)
        budget = min(budget, self.config.max_rows_with_drafts - rows)
        for rid, s in chosen.items():
            req = s.request
            drafts = min(len(req.draft_token_ids), budget)
            if drafts <= 0 or s.num_new_tokens != 1 or not s.samples:
                continue
            if self._room_for_drafts(req, req.num_computed_tokens + 1 + drafts):
                chosen[rid] = ScheduledRequest(req, 1 + drafts, drafts)
                budget -= drafts

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; ``sampled`` maps request id to its new token for
        those whose step reached the end of their sequence. Returns the requests that got a
        token this step (some may now be finished). A synchronous step's ``advance`` and
        ``add_tokens`` together."""
        self.advance(out, {s.request.request_id: s.num_draft_tokens for s in out.scheduled})  # one token each
        scheduled = [s.request for s in out.scheduled]
        added = self.add_tokens([(r, sampled[r.request_id]) for r in scheduled if r.request_id in sampled])
        return [r for r, _ in added]

    def advance(self, out: SchedulerOutput, rejected: Mapping[str, int] | None = None) -> None:
        """The step's tokens are in the KV cache (with async scheduling: will be, before any later
        step reads them, the device running steps in order): each running request's
        num_computed_tokens moves on and its newly full blocks join the prefix cache.
        ``rejected``: per request id, how many of its draft tokens the model did not confirm
        (their K/V is not the sequence's: the request's computed tokens stop before them)."""
        for s in out.scheduled:
            req = s.request
            if req.status is RequestStatus.RUNNING:  # else aborted while the step ran
                req.num_computed_tokens += s.num_new_tokens - (rejected or {}).get(req.request_id, 0)
                self.blocks.commit_computed_blocks(req)

    def add_tokens(self, sampled: Iterable[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Append each request's sampled token (or fill in its pending one, async scheduling)
        and finish those that stop; a request may come with several tokens in a row (verified
        drafts), and those after the one it stops on are dropped. Returns the (request, token)
        pairs appended, in order."""
        advanced: list[tuple[Request, int]] = []
        for req, token in sampled:
            if req.awaiting_token:  # running, or preempted by the step scheduled meanwhile
                req.fill_pending(token)
            elif req.status is RequestStatus.RUNNING:
                req.append_token(token)
            else:
                continue  # aborted while the step ran (a pending token was dropped then)
            advanced.append((req, token))
            stop = req.check_stop()
            if stop is not None:
                (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
                self._finish(req, stop)
        return advanced

    def take_finished(self) -> list[Request]:
        done, self.finished = self.finished, []
        return done

    # ---- internals -----------------------------------------------------------------------

    def _batch_shares(self) -> tuple[dict[str, int], dict[str, float]]:
        """Running requests per tenant, and each tenant's share of the slots (max_num_seqs x its
        weight / the weights of every tenant with work here); empty with a single tenant."""
        running: dict[str, int] = {}
        weights: dict[str, float] = {}
        for req in self.running:
            running[req.tenant.name] = running.get(req.tenant.name, 0) + 1
            weights[req.tenant.name] = req.tenant.weight
        for req in self.waiting:
            weights.setdefault(req.tenant.name, req.tenant.weight)
        if len(weights) < 2:
            return {}, {}
        total = sum(weights.values())
        return running, {t: self.config.max_num_seqs * w / total for t, w in weights.items()}

    def _share_full_batch(self, out: SchedulerOutput) -> None:
        """Step 0 of schedule() (module docstring): with every slot taken and a waiting tenant
        under its share, preempt the newest request of the tenant furthest over its own."""
        if len(self.running) < self.config.max_num_seqs or not self.waiting:
            return
        running, share = self._batch_shares()
        if not share or not any(running.get(r.tenant.name, 0) < share[r.tenant.name] for r in self.waiting):
            return
        over = max(running, key=lambda t: running[t] / share[t])
        if running[over] <= share[over]:
            return
        victim = max((r for r in self.running if r.tenant.name == over), key=lambda r: r.sort_key)
        self.running.remove(victim)
        self._preempt(victim, {}, out)

    def _room_for_drafts(self, req: Request, num_tokens: int) -> bool:
        """Allocate slots for a request's draft tokens if that leaves a free block for every
        running request (each may need one to grow next step): drafts never cause a preemption."""
        extra = self.blocks.blocks_needed(num_tokens) - len(req.block_ids)
        if extra <= 0:
            return True
        return self.blocks.num_free_blocks - extra >= len(self.running) and self.blocks.allocate(
            req, num_tokens
        )

    def _next_waiting(self) -> int:
        """Index of the waiting request to admit next: the first in line of each tenant; of
        those, a tenant running fewer than its share of the slots goes before the others, and
        among them the one whose turn it is (FairShares)."""
        first: dict[str, int] = {}
        for i, req in enumerate(self.waiting):
            first.setdefault(req.tenant.name, i)
        if len(first) == 1:
            return 0
        running, share = self._batch_shares()
        under = [t for t in first if running.get(t, 0) < share[t]]
        tenant = self._shares.pick(under or first)
        assert tenant is not None
        return first[tenant]

    def _enqueue(self, req: Request, front: bool = False) -> None:
        keys = [r.sort_key for r in self.waiting]
        pos = bisect.bisect_left(keys, req.sort_key) if front else bisect.bisect_right(keys, req.sort_key)
        self.waiting.insert(pos, req)

    def _preempt(self, req: Request, chosen: dict[str, ScheduledRequest], out: SchedulerOutput) -> int:
        """Free a running request's blocks and requeue it; returns budget given back."""
        self.blocks.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        out.preempted.append(req)
        self._enqueue(req, front=True)
        given_back = chosen.pop(req.request_id, None)
        return given_back.num_new_tokens if given_back else 0

    def release(self, req: Request) -> None:
        """Free the blocks of a finished request that was kept with ``keep_blocks``."""
        assert req.status.finished, "release() is for finished requests"
        self.blocks.free_request(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.drop_pending()  # aborted before the token arrived: its output ends before it
        req.status = status
        if not req.keep_blocks or status is RequestStatus.FINISHED_ABORTED:
            self.blocks.free_request(req)
        self.finished.append(req)
