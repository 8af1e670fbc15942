"""LLMEngine: requests in, tokens out. One ``step()`` is schedule -> run -> update.

Used directly by the offline ``LLM`` API and, on their own step threads, by the worker services
(through AsyncEngine). Its methods are every lifecycle step a request has:

    make_request ──> add ─────────────────────────────> step() ... TokenEvent(finished)
                 └─> add (prefill_only) ──> step() ──> first token, blocks kept ──> release
                 └─> reserve_remote ──> remote_kv_landed(first token) ──> step() ... finished
    abort / abort_all at any point; stats() for load reports; close() at the end (it stops the
    tensor-parallel ranks of a tensor_parallel_size > 1 engine)

Callers get what they need from the return values and events (``FinishedRequest`` on a request's
last event); they never touch the scheduler or mutate a Request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import torch

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.config import EngineConfig
from scalellm.engine.events import EngineStats, RemoteReservation, TokenEvent, outcome
from scalellm.engine.grammar import GrammarCompiler
from scalellm.engine.model_runner import LaunchedStep, ModelRunner
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.sampler import SamplerOutput
from scalellm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from scalellm.engine.speculative import NgramDrafter, accepted
from scalellm.kvhash import BlockHashDelta
from scalellm.models.config import ModelConfig
from scalellm.models.prepare import resolve_model_dir
from scalellm.types import DEFAULT_TENANT, InvalidParameter, SamplingParams, TenantShare, TokenLogprobs

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        model_dir = resolve_model_dir(config.model)  # None: the demo model, prepared if need be
        self.config = config = replace(config, model=str(model_dir))
        self.model_config = ModelConfig.from_dir(model_dir)
        self.max_model_len = self._max_model_len()
        self.runner = ModelRunner(config, self.model_config, self.max_model_len)
        self.block_size = config.block_size
        self.num_blocks = self.runner.num_blocks
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * self.block_size)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                prefill_tokens_with_decodes=config.max_prefill_tokens_with_decodes,
                max_rows_with_drafts=config.draft_rows(),
                watermark_blocks=max(1, self.runner.num_blocks // 100),
            ),
            self.blocks,
        )
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.grammars = GrammarCompiler(model_dir, self.model_config.vocab_size, self.eos_token_ids)
        """Structured output, compiled in make_request (off the step thread) and cached."""
        self._kept: dict[str, Request] = {}
        """Finished prefill-only requests whose blocks are held until release()."""
        self._landing: torch.Tensor | None = None
        self._in_flight: LaunchedStep | None = None
        """The step launched by the last step() call, its tokens not applied yet (async scheduling)."""
        self.drafter = (
            NgramDrafter(
                config.num_speculative_tokens,
                config.prompt_lookup_min,
                config.prompt_lookup_max,
                config.draft_rows(),
            )
            if config.num_speculative_tokens
            else None
        )
        """Speculative decoding's drafts (None: off); its counts are the acceptance metrics."""
        if config.async_scheduling and self.runner.device.type == "cpu":
            log.warning(
                "async scheduling on a CPU overlaps nothing (the forward pass runs as it is launched) "
                "and reports each token one step later; it is meant for GPUs"
            )

    def _max_model_len(self) -> int:
        limit = self.model_config.context_length  # within a sliding window: none is implemented
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's {limit}")
            limit = self.config.max_model_len
        return limit

    @property
    def kv_cache(self) -> torch.Tensor:
        """The block-major KV cache (what the transfer layer sends from and receives into)."""
        return self.runner.kv_cache

    # ---- building requests (any thread: reads only the immutable configuration) ----------

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        *,
        prefill_only: bool = False,
        resume_token_ids: Sequence[int] = (),
        tenant: TenantShare = DEFAULT_TENANT,
    ) -> Request:
        """Validate and build a request (not yet queued). A prefill-only request stops after its
        first token and keeps its blocks until ``release()`` (a prefill worker's, whose KV is
        sent after the first token). Structured output is compiled here (cached per spec; an
        uncached one may take milliseconds: the workers call this off their event loop).

        resume_token_ids: output another worker generated before it failed (stream migration);
        the request continues after them exactly as it would have there (greedy and seeded
        sampling alike), counting them against max_tokens."""
        if params.n != 1:
            raise InvalidParameter(
                "n", f"must be 1 in the engine (the gateway fans out n > 1), got {params.n}"
            )
        if params.stop:
            raise InvalidParameter(
                "stop", "strings are applied to text by the gateway; the engine takes stop_token_ids"
            )
        if params.bad_words:
            raise InvalidParameter(
                "bad_words", "strings are tokenized by the gateway; the engine takes bad_words_token_ids"
            )
        if prefill_only and params.prompt_logprobs is not None:
            raise InvalidParameter(
                "prompt_logprobs", "are computed where the prompt runs, never on a prefill-only request"
            )
        if params.prompt_logprobs is not None and self.config.tensor_parallel_size > 1:
            raise InvalidParameter("prompt_logprobs", "are not computed under tensor parallelism")
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        vocab = self.model_config.vocab_size
        params.check_vocabulary(vocab)
        _check_in_vocab("prompt_token_ids", prompt_token_ids, vocab)
        _check_in_vocab("resume_token_ids", resume_token_ids, vocab)
        if prefill_only and resume_token_ids:
            raise ValueError("a prefill-only request cannot resume generated tokens")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {len(prompt_token_ids)} tokens; the context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if resume_token_ids and len(resume_token_ids) >= max_tokens:
            raise ValueError(
                f"resume_token_ids has {len(resume_token_ids)} tokens; the request may generate "
                f"{max_tokens}, so nothing would be left to generate"
            )
        spec = params.structured_output
        grammar = self.grammars.compile(spec).matcher() if spec is not None else None
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            max_tokens=1 if prefill_only else max_tokens,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            tenant=tenant,
            keep_blocks=prefill_only,
            grammar=grammar,
        )
        req.resume(resume_token_ids)
        return req

    # ---- the lifecycle (the step thread only) ---------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request built by make_request()."""
        self.scheduler.add(req)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> Request:
        req = self.make_request(request_id, prompt_token_ids, params, priority)
        self.add(req)
        return req

    def abort_request(self, request_id: str) -> Request | None:
        """Abort the request wherever it is and free its blocks (None: unknown or finished). A
        finished prefill-only request that still keeps its blocks gives them back."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self.runner.sampler.release(request_id)
        else:
            self.release(request_id)
        return req

    def abort_all(self) -> list[TokenEvent]:
        """Abort every unfinished request; returns their last events. Blocks reserved for remote
        KV stay held until their owner settles them (remote_kv_landed or abort_request), since a
        transfer may still be writing into them."""
        events = []
        for req in self.scheduler.abort_all():
            self.runner.sampler.release(req.request_id)
            events.append(TokenEvent(req, None, None, outcome(req)))
        self.scheduler.take_finished()
        return events

    def release(self, request_id: str) -> None:
        """Free the blocks a finished prefill-only request kept (no-op if it has none)."""
        req = self._kept.pop(request_id, None)
        if req is not None:
            self.scheduler.release(req)

    def reserve_remote(self, req: Request) -> RemoteReservation | None:
        """Reserve blocks for the whole prompt of a request built by make_request(), whose KV a
        prefill worker will push. None (nothing held) when the blocks are not free now."""
        if not self.scheduler.reserve_remote(req):
            return None
        skip = req.num_cached_tokens // self.block_size
        return RemoteReservation(skip, tuple(req.block_ids[skip:]))

    def remote_kv_landed(
        self, request_id: str, first_token: int, logprobs: TokenLogprobs | None, num_cached_tokens: int
    ) -> TokenEvent:
        """The prompt's KV is in the reserved blocks and the prefill worker sampled first_token
        (with logprobs; num_cached_tokens of the prompt were in its prefix cache). The request
        joins the running batch; the event carries the first token (or an abort, if abort_all
        ran meanwhile)."""
        req = self.scheduler.remote_kv_ready(request_id, first_token)
        if req.status is RequestStatus.FINISHED_ABORTED:  # abort_all() ran while its KV was in flight
            return TokenEvent(req, None, None, outcome(req))
        req.num_cached_tokens = num_cached_tokens
        if logprobs is not None:
            req.logprobs.append(logprobs)
        return TokenEvent(req, first_token, logprobs, outcome(req) if req.status.finished else None)

    def gather_kv(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks' K/V with all the model's heads (ModelRunner.gather_kv); on the
        step thread between steps (a tensor-parallel engine's ranks take part)."""
        kv = self.runner.gather_kv(block_ids)
        assert kv is not None, "rank 0 holds the gathered heads"
        return kv

    def kv_landing(self) -> torch.Tensor:
        """Where pushed KV lands, in the layout every worker sends (all the model's K/V heads):
        the cache itself at tensor_parallel_size 1; else a tensor of as many blocks with every
        head, on rank 0 (allocated on first use; it costs N times rank 0's cache), whose landed
        blocks scatter_kv hands to the ranks."""
        if self.config.tensor_parallel_size == 1:
            return self.kv_cache
        if self._landing is None:
            self._landing = self.runner.empty_full_kv(self.num_blocks)
        return self._landing

    def scatter_kv(self, block_ids: list[int]) -> None:
        """Copy the blocks landed in kv_landing() into the ranks' caches, each rank its heads
        (nothing to do at tensor_parallel_size 1, where KV lands in the cache); on the step
        thread between steps, before remote_kv_landed."""
        if self.config.tensor_parallel_size > 1 and block_ids:
            self.runner.scatter_kv(block_ids, self.kv_landing())

    def empty_full_kv(self) -> torch.Tensor:
        """Zero blocks shaped as gather_kv's results: what a tensor-parallel worker's KV layout
        (all the model's heads) is read from."""
        return self.runner.empty_full_kv()

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (idempotent); the engine takes no steps after."""
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def take_block_hash_delta(self, full: bool = False) -> BlockHashDelta:
        """Prefix-cache hashes added and evicted since the last call (with ``full``: all cached
        hashes, as a reset); a worker publishes them for prefix-aware routing."""
        return self.blocks.take_hash_delta(full)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(
            num_running=len(sched.running) + len(sched.remote),
            num_waiting=len(sched.waiting),
            num_free_blocks=self.blocks.num_free_blocks,
            num_blocks=self.num_blocks,
            prefill_backlog_tokens=sched.prefill_backlog_tokens,
        )

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Schedule a step, run it, apply its tokens; returns their events. The previous step's
        tokens (async scheduling) are applied between the step's forward pass and its sampling,
        so that sampling sees every token (grammars, penalties) while the forward pass runs:

            call k:  schedule S(k) | forward S(k) | apply S(k-1)'s tokens | sample S(k) | advance S(k)
            device:  ... S(k-1) runs ............ S(k) runs ...

        With async scheduling S(k)'s tokens are left on their way to the host (each sampling
        request holds a pending token, which S(k+1)'s forward pass takes on the device); else
        they are applied at once. A request that finishes in S(k-1) still has a row in S(k),
        discarded."""
        if self.drafter is not None:
            self.drafter.draft(self.scheduler.running)
        out = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        ran = None if out.empty else self.runner.forward(out.scheduled, previous)
        events = [] if previous is None else self._apply(previous.requests, previous.output())
        launched = None if ran is None else self.runner.sample(ran)
        if launched is not None and self.config.async_scheduling:
            self.scheduler.advance(out)
            for req in launched.requests:
                if req.status is RequestStatus.RUNNING:  # else it finished in the previous step
                    req.append_pending()
            self._in_flight = launched
        elif launched is not None:
            requests, sampled, rejected = self._verify(out, launched.requests, launched.output())
            self.scheduler.advance(out, rejected)
            events += self._apply(requests, sampled)
        else:
            self.scheduler.advance(out)
        return self._drain_finished(events)

    def _verify(
        self, out: SchedulerOutput, requests: list[Request], sampled: SamplerOutput
    ) -> tuple[list[Request], SamplerOutput, dict[str, int]]:
        """A step's rows as the tokens its requests get: a request that fed draft tokens has a
        row per draft plus one and keeps the rows up to the first that disagrees with its draft
        (speculative.accepted); returns those rows and each such request's rejected drafts."""
        if self.drafter is None:  # speculative decoding off: nothing to look for in the step
            return requests, sampled, {}
        drafts = {s.request.request_id: s.num_draft_tokens for s in out.scheduled if s.num_draft_tokens}
        if not drafts:
            return requests, sampled, {}
        rows: list[int] = []
        rejected: dict[str, int] = {}
        i = 0
        while i < len(requests):
            req = requests[i]
            d = drafts.get(req.request_id, 0)
            kept = accepted(req.draft_token_ids[:d], sampled.token_ids[i : i + d + 1])
            rows.extend(range(i, i + len(kept)))
            if d:
                rejected[req.request_id] = d + 1 - len(kept)
                self.drafter.count(d, len(kept) - 1)
                self.runner.sampler.keep_draws(req.request_id, len(kept), d + 1)
            i += d + 1
        token_ids = [sampled.token_ids[r] for r in rows]
        return (
            [requests[r] for r in rows],
            SamplerOutput(token_ids, [sampled.logprobs[r] for r in rows]),
            rejected,
        )

    def _apply(self, requests: list[Request], sampled: SamplerOutput) -> list[TokenEvent]:
        """A step's sampled tokens (a request may have several: verified drafts) and their
        logprobs into its requests."""
        rows = list(zip(requests, sampled.token_ids, sampled.logprobs, strict=True))
        added = self.scheduler.add_tokens((r, t) for r, t, _ in rows)
        last = {id(r): i for i, (r, _) in enumerate(added)}
        events, j = [], 0
        for i, (req, token) in enumerate(added):
            while rows[j][0] is not req:  # added is rows without those add_tokens dropped
                j += 1
            lp = rows[j][2]
            j += 1
            if lp is not None:
                req.logprobs.append(lp)
            ends = req.status.finished and i == last[id(req)]
            events.append(TokenEvent(req, token, lp, outcome(req) if ends else None, _prompt_logprobs(req)))
        return events

    def _drain_finished(self, events: list[TokenEvent]) -> list[TokenEvent]:
        reported = {e.request.request_id for e in events}
        for req in self.scheduler.take_finished():
            self.runner.sampler.release(req.request_id)
            if req.keep_blocks and req.block_ids:
                self._kept[req.request_id] = req
            if req.request_id not in reported and req.status is RequestStatus.FINISHED_ABORTED:
                events.append(TokenEvent(req, None, None, outcome(req)))
        return events

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks


def _check_in_vocab(name: str, token_ids: Sequence[int], vocab: int) -> None:
    bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"{name} contains {bad!r}, outside the vocabulary [0, {vocab})")


def _prompt_logprobs(req: Request) -> tuple[TokenLogprobs, ...] | None:
    """The prompt's logprobs, on the event of a request's first token when it asked for them."""
    if req.sampling_params.prompt_logprobs is None or req.num_output_tokens - req.resumed_tokens != 1:
        return None
    return tuple(req.prompt_logprobs)
