"""EngineHost: the engine of one worker, on its step thread, with its metrics and load report."""

from __future__ import annotations

import time

from scalellm.engine.async_engine import AsyncEngine
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine, TokenEvent
from scalellm.models.prepare import resolve_model_dir
from scalellm.registry import WorkerInfo, WorkerLoad
from scalellm.worker.config import WorkerConfig
from scalellm.worker.load_window import LoadWindow, prefill_backlog_tokens
from scalellm.worker.metrics import WorkerMetrics


class EngineHost:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.model_dir = resolve_model_dir(config.model)
        self.model_name = config.served_model_name or self.model_dir.name
        self.engine = LLMEngine(
            EngineConfig(
                model=str(self.model_dir),
                dtype=config.dtype,
                device=config.device,
                block_size=config.block_size,
                num_kv_blocks=config.num_kv_blocks,
                kv_cache_gb=config.kv_cache_gb,
                max_model_len=config.max_model_len,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                num_threads=config.num_threads,
            )
        )
        self.aengine = AsyncEngine(self.engine, on_step=self._on_step)
        self._window = LoadWindow()
        """Token rate, TTFT, ITL and prefill backlog: written by the step thread, read by load()."""
        # Live values, read when /metrics is scraped (len() reads are atomic under the GIL).
        sched = self.engine.scheduler
        metrics.total_blocks.set(self.engine.blocks.num_blocks)
        metrics.free_blocks.set_function(lambda: self.engine.num_free_blocks)
        metrics.waiting.set_function(lambda: len(sched.waiting))
        metrics.running.set_function(lambda: len(sched.running) + len(sched.remote))

    def start(self) -> None:
        self.aengine.start()

    def stop(self) -> None:
        self.aengine.stop()

    def info(self, grpc_address: str, transfer_endpoint: str = "") -> WorkerInfo:
        from scalellm import __version__

        return WorkerInfo(
            worker_id=self.config.worker_id,
            role=self.config.role,
            model=self.model_name,
            grpc_address=grpc_address,
            kv_capacity_blocks=self.engine.blocks.num_blocks,
            kv_block_size=self.engine.block_size,
            transfer_endpoint=transfer_endpoint,
            version=__version__,
            max_running=self.config.max_num_seqs,
        )

    def load(self) -> WorkerLoad:
        """The load right now. Read from the event loop: len() of the scheduler's queues is atomic
        under the GIL, and a value one step old is fine for routing."""
        sched = self.engine.scheduler
        measured = self._window.signals()
        return WorkerLoad(
            running=len(sched.running) + len(sched.remote),
            waiting=len(sched.waiting),
            free_blocks=self.engine.num_free_blocks,
            tokens_per_second=measured.tokens_per_second,
            prefill_backlog_tokens=measured.prefill_backlog_tokens,
            ttft_s=measured.ttft_s,
            itl_s=measured.itl_s,
        )

    def _on_step(self, engine: LLMEngine, events: list[TokenEvent]) -> None:
        """Step thread: fold the step into the load window (the scheduler's queues are ours here)."""
        sched = engine.scheduler
        backlog = prefill_backlog_tokens(sched.waiting, sched.running)
        self.metrics.tokens.inc(self._window.on_step(time.monotonic(), events, backlog))
