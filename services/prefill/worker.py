"""PrefillWorker: compute prompts for decode workers and push their KV.

    Prefill rpc ──> engine (batched, chunked; max one token, blocks kept) ──> first token
                ──> push KV over the pair channel to the asking decode worker ──> reply

A prompt's blocks stay held after its first token until the push has finished, then return to
the pool (still in the prefix cache). Cancelling the rpc removes a queued or running prefill.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from scalellm.engine.events import TokenEvent
from scalellm.engine.request import Request
from scalellm.transfer import KVLayout, TransferClient
from scalellm.types import (
    DEFAULT_TENANT,
    FinishReason,
    KVDestination,
    PrefillResult,
    SamplingParams,
    TenantShare,
)
from scalellm.worker.config import WorkerConfig
from scalellm.worker.engine_host import EngineHost
from scalellm.worker.errors import Unavailable
from scalellm.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, config: WorkerConfig, host: EngineHost, metrics: WorkerMetrics) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.client: TransferClient | None = None
        self.draining = False
        self.in_flight = 0

    @property
    def transfer_endpoint(self) -> str:
        return ""

    async def start(self) -> None:
        self.host.start()
        engine = self.host.engine
        # A tensor-parallel worker's cache holds one rank's heads; it sends gathered ones (_gather)
        kv = engine.kv_cache if engine.config.tensor_parallel_size == 1 else engine.empty_full_kv()
        layout = KVLayout.from_kv_cache(kv, self.host.model_name)
        self.client = TransferClient(self.config.worker_id, layout, kv, self.config.channel_config())

    async def stop(self) -> None:
        if self.client is not None:
            await asyncio.to_thread(self.client.close)
        self.host.stop()

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int,
        target: KVDestination,
        *,
        tenant: TenantShare = DEFAULT_TENANT,
    ) -> PrefillResult:
        if self.draining:
            raise Unavailable(f"prefill worker {self.config.worker_id} is draining")
        if not target.decode_worker_id or not target.transfer_endpoint:
            raise ValueError("destination.decode_worker_id and destination.transfer_endpoint are required")
        # The same request id may come from two decode workers: qualify it.
        rid = f"{target.decode_worker_id}/{request_id}/{target.transfer_id}"
        req = await self.host.make_request(
            rid, prompt_token_ids, params, priority, prefill_only=True, tenant=tenant
        )
        if not target.block_ids or target.skip_blocks * self.host.engine.block_size >= req.num_prompt_tokens:
            raise ValueError(
                f"destination.block_ids is empty or skip_blocks={target.skip_blocks} skips the whole "
                f"{req.num_prompt_tokens}-token prompt"
            )  # their exact count is checked by the channel, after it has compared KV layouts
        self.in_flight += 1
        try:
            return await self._run(req, target)
        finally:
            self.in_flight -= 1

    async def _run(self, req: Request, target: KVDestination) -> PrefillResult:
        aengine = self.host.aengine
        events = [event async for event in aengine.add_and_stream(req)]  # one: the first token
        first: TokenEvent = events[-1]
        done = first.outcome
        if done is None or done.finish_reason is FinishReason.ABORT or first.token_id is None:
            raise Unavailable(f"prefill of {req.request_id} was aborted")
        computed = time.monotonic()
        loop = asyncio.get_running_loop()

        def release(_: object = None) -> None:  # the blocks return to the pool once the push is over
            loop.call_soon_threadsafe(aengine.release, req.request_id)

        try:
            assert self.client is not None
            skip = target.skip_blocks
            src, source = await self._gather(list(done.kept_block_ids[skip : skip + len(target.block_ids)]))
            future = self.client.submit_kv(
                target.decode_worker_id, target.transfer_endpoint, target.transfer_id,
                src, list(target.block_ids), done.num_prompt_tokens - skip * self.host.engine.block_size,
                source,
            )  # fmt: skip
        except Exception as exc:
            release()
            self.metrics.transfer_failures.inc()
            raise Unavailable(f"KV transfer to {target.decode_worker_id} failed: {exc}") from exc
        future.add_done_callback(release)
        try:
            stats = await asyncio.wrap_future(future)
        except ValueError as exc:  # destination blocks that do not fit the prompt
            self.metrics.transfer_failures.inc()
            raise ValueError(f"bad destination: {exc}") from exc
        except Exception as exc:
            self.metrics.transfer_failures.inc()
            raise Unavailable(f"KV transfer to {target.decode_worker_id} failed: {exc}") from exc
        self.metrics.transfer_bytes.labels("out").inc(stats.bytes)
        self.metrics.transfer_seconds.labels("out").inc(stats.seconds)
        self.metrics.requests.labels("prefilled").inc()
        scheduled = done.scheduled_time or done.arrival_time
        self.metrics.ttft.observe(computed - done.arrival_time)
        return PrefillResult(
            first_token_id=first.token_id,
            logprobs=first.logprobs,
            cached_tokens=done.num_cached_tokens,
            queue_seconds=scheduled - done.arrival_time,
            prefill_seconds=computed - scheduled,
            transfer_seconds=stats.seconds,
            transfer_bytes=stats.bytes,
        )

    async def _gather(self, blocks: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """The blocks to send and the tensor they are in: the cache itself, or at TP > 1 a copy
        with every rank's heads (the decode worker's layout has all of them)."""
        if self.host.engine.config.tensor_parallel_size == 1:
            return blocks, None
        return list(range(len(blocks))), await self.host.aengine.gather_kv(blocks)
