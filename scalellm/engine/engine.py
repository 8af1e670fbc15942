"""LLMEngine: requests in, tokens out. One ``step()`` is schedule -> run -> update.

Used directly by the offline ``LLM`` API and, on their own threads, by the worker services.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.config import EngineConfig
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.request import Request, RequestStatus, TokenLogprobs
from scalellm.engine.sampling_params import SamplingParams
from scalellm.engine.scheduler import Scheduler, SchedulerConfig
from scalellm.models.config import ModelConfig


@dataclass(frozen=True)
class TokenEvent:
    """One step's news for one request: a new token, and whether that finished it."""

    request: Request
    token_id: int | None
    """None for a request that finished without a new token (aborted)."""
    logprobs: TokenLogprobs | None
    finished: bool


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.max_model_len = self._max_model_len()
        self.runner = ModelRunner(config, self.model_config, self.max_model_len)
        self.block_size = config.block_size
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * self.block_size)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                watermark_blocks=max(1, self.runner.num_blocks // 100),
            ),
            self.blocks,
        )
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)

    def _max_model_len(self) -> int:
        cfg = self.model_config
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            limit = min(limit, cfg.sliding_window)  # no sliding-window attention: stay inside it
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's {limit}")
            limit = self.config.max_model_len
        return limit

    # ---- requests ------------------------------------------------------------------------

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> Request:
        """Validate and build a request (not yet queued)."""
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids contains {bad!r}, outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {len(prompt_token_ids)} tokens; the context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
        )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> Request:
        req = self.make_request(request_id, prompt_token_ids, params, priority)
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> Request | None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            self.runner.sampler.release(request_id)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        out = self.scheduler.schedule()
        if out.empty:
            return self._drain_finished([])
        sampled_reqs, sampled = self.runner.execute(out.scheduled)
        tokens = {r.request_id: t for r, t in zip(sampled_reqs, sampled.token_ids, strict=True)}
        logprobs = {r.request_id: lp for r, lp in zip(sampled_reqs, sampled.logprobs, strict=True)}
        for req, lp in zip(sampled_reqs, sampled.logprobs, strict=True):
            if lp is not None:
                req.logprobs.append(lp)
        advanced = self.scheduler.update(out, tokens)
        events = [TokenEvent(r, r.token_ids[-1], logprobs[r.request_id], r.status.finished) for r in advanced]
        return self._drain_finished(events)

    def _drain_finished(self, events: list[TokenEvent]) -> list[TokenEvent]:
        reported = {e.request.request_id for e in events}
        for req in self.scheduler.take_finished():
            self.runner.sampler.release(req.request_id)
            if req.request_id not in reported and req.status is RequestStatus.FINISHED_ABORTED:
                events.append(TokenEvent(req, None, None, True))
        return events

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks
