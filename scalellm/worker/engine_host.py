"""EngineHost: the engine of one worker, on its step thread, with its metrics and load report."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from scalellm.engine.async_engine import AsyncEngine
from scalellm.engine.engine import LLMEngine
from scalellm.engine.events import TokenEvent
from scalellm.models.prepare import resolve_model_dir
from scalellm.registry import WorkerInfo, WorkerLoad
from scalellm.worker.config import WorkerConfig
from scalellm.worker.metrics import WorkerMetrics

_RATE_WINDOW_S = 10.0


class EngineHost:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.model_dir = resolve_model_dir(config.engine.model)
        self.model_name = config.served_model_name or self.model_dir.name
        self.engine = LLMEngine(replace(config.engine, model=str(self.model_dir)))
        self.aengine = AsyncEngine(self.engine, on_step=self._on_step)
        self._token_times: deque[tuple[float, int]] = deque()
        """(time, tokens) of each step in the last window; touched by the step thread only."""
        self._rate: tuple[float, float] = (0.0, 0.0)
        """(tokens per second, when computed): written whole by the step thread, read by load()."""
        # Live values, read when /metrics is scraped: the engine's last published snapshot.
        aengine = self.aengine
        metrics.total_blocks.set(self.engine.num_blocks)
        metrics.free_blocks.set_function(lambda: aengine.stats.num_free_blocks)
        metrics.waiting.set_function(lambda: aengine.stats.num_waiting)
        metrics.running.set_function(lambda: aengine.stats.num_running)

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
            kv_capacity_blocks=self.engine.num_blocks,
            kv_block_size=self.engine.block_size,
            transfer_endpoint=transfer_endpoint,
            version=__version__,
        )

    def load(self) -> WorkerLoad:
        """The load right now: the engine's snapshot after its last step or command (a value one
        step old is fine for routing)."""
        stats = self.aengine.stats
        rate, at = self._rate
        return WorkerLoad(
            running=stats.num_running,
            waiting=stats.num_waiting,
            free_blocks=stats.num_free_blocks,
            tokens_per_second=rate if time.monotonic() - at <= _RATE_WINDOW_S else 0.0,
        )

    def _on_step(self, engine: LLMEngine, events: list[TokenEvent]) -> None:
        """Step thread: the token rate over the last window, published as one tuple."""
        now = time.monotonic()
        new_tokens = sum(1 for e in events if e.token_id is not None)
        window = self._token_times
        window.append((now, new_tokens))
        while now - window[0][0] > _RATE_WINDOW_S:
            window.popleft()
        span = now - window[0][0]
        self._rate = (sum(n for _, n in window) - window[0][1]) / span if span > 0 else 0.0, now
        self.metrics.tokens.inc(new_tokens)
