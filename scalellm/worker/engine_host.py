"""EngineHost: the engine of one worker, on its step thread, with its metrics and load report."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from scalellm.engine.async_engine import AsyncEngine, build_engine
from scalellm.engine.engine import LLMEngine
from scalellm.engine.events import TokenEvent
from scalellm.engine.request import Request
from scalellm.models.prepare import resolve_model_dir
from scalellm.registry import WorkerInfo, WorkerLoad
from scalellm.types import DEFAULT_TENANT, SamplingParams, TenantShare
from scalellm.worker.config import WorkerConfig
from scalellm.worker.cpu_share import CpuShare
from scalellm.worker.load_window import LoadWindow
from scalellm.worker.metrics import WorkerMetrics


class EngineHost:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.model_dir = resolve_model_dir(config.engine.model)
        self.model_name = config.served_model_name or self.model_dir.name
        engine_config = replace(config.engine, model=str(self.model_dir))
        self.engine = build_engine(lambda: LLMEngine(engine_config))
        self._cpu_share: CpuShare | None = None
        """Cores shared with the other CPU workers of this machine (cpu_share.py)."""
        if config.cpu_share_file and engine_config.torch_device().type == "cpu":
            self._cpu_share = CpuShare(Path(config.cpu_share_file), config.cpu_share_slot)
        before_step = self._before_step if self._cpu_share is not None else None
        self.aengine = AsyncEngine(self.engine, on_step=self._on_step, before_step=before_step)
        self._window = LoadWindow()
        """Token rate, TTFT and ITL: written by the step thread, read by load()."""
        # Live values, read when /metrics is scraped: the engine's last published snapshot.
        aengine = self.aengine
        metrics.total_blocks.set(self.engine.num_blocks)
        metrics.free_blocks.set_function(lambda: aengine.stats.num_free_blocks)
        metrics.waiting.set_function(lambda: aengine.stats.num_waiting)
        metrics.running.set_function(lambda: aengine.stats.num_running)
        drafter = self.engine.drafter
        if drafter is not None:
            metrics.watch_speculation(lambda: drafter.drafted, lambda: drafter.accepted)

    def start(self) -> None:
        self.aengine.start()

    async def make_request(
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
        """The engine's make_request, off the event loop when it compiles structured output (a
        new spec takes milliseconds, the first one also loads the grammar tokenizer)."""
        make = functools.partial(
            self.engine.make_request,
            request_id,
            prompt_token_ids,
            params,
            priority,
            prefill_only=prefill_only,
            resume_token_ids=resume_token_ids,
            tenant=tenant,
        )
        return make() if params.structured_output is None else await asyncio.to_thread(make)

    def stop(self) -> None:
        self.aengine.stop()
        self.engine.close()
        if self._cpu_share is not None:
            self._cpu_share.close()

    def info(self, grpc_address: str, transfer_endpoint: str = "") -> WorkerInfo:
        from scalellm import __version__

        return WorkerInfo(
            worker_id=self.config.worker_id,
            role=self.config.role,
            model=self.model_name,
            grpc_address=grpc_address,
            kv_capacity_blocks=self.engine.num_blocks,
            kv_block_size=self.engine.block_size,
            transfer_endpoint=transfer_endpoint,
            version=__version__,
            max_running=self.config.engine.max_num_seqs,
        )

    def load(self) -> WorkerLoad:
        """The load right now: the engine's snapshot after its last step or command (queues, free
        blocks, prefill backlog) and the window's measurements (a value one step old is fine for
        routing and planning)."""
        stats = self.aengine.stats
        measured = self._window.signals()
        return WorkerLoad(
            running=stats.num_running,
            waiting=stats.num_waiting,
            free_blocks=stats.num_free_blocks,
            tokens_per_second=measured.tokens_per_second,
            prefill_backlog_tokens=stats.prefill_backlog_tokens,
            ttft_s=measured.ttft_s,
            itl_s=measured.itl_s,
        )

    def _before_step(self, busy: bool) -> None:
        """Step thread: take this worker's share of the cores for the next step (torch's threads
        are set here, on the thread that runs the steps)."""
        assert self._cpu_share is not None  # hooked only with a share
        threads = self._cpu_share.threads(busy)
        if busy and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _on_step(self, _engine: LLMEngine, events: list[TokenEvent]) -> None:
        """Step thread: fold the step's events into the load window."""
        self.metrics.tokens.inc(self._window.on_step(time.monotonic(), events))
