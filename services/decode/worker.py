"""DecodeWorker: generate a request's tokens, its prompt's KV computed here or pushed by a
prefill worker. Plain asyncio over the engine; the gRPC servicer is a thin layer on top.

Disaggregated path (a prefill target is given):

    reserve blocks ──> Prefill rpc to the target ──> KV lands (receiver thread) ──> join batch
         │ none free: RESOURCE_EXHAUSTED     │ rpc or transfer fails: cancel the transfer,
                                             │ try the next target, then recompute here
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import grpc

from scalellm.engine.request import Request, RequestStatus, TokenLogprobs
from scalellm.engine.sampling_params import SamplingParams
from scalellm.transfer import KVLayout, TransferServer
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from scalellm.worker.config import PrefillFallback, WorkerConfig
from scalellm.worker.convert import logprobs_from_proto, sampling_to_proto
from scalellm.worker.engine_host import EngineHost
from scalellm.worker.errors import ResourceExhausted, Unavailable
from scalellm.worker.metrics import WorkerMetrics
from services.decode.transfers import PendingTransfers

log = logging.getLogger(__name__)

# gRPC codes after which another prefill worker (or local recompute) may succeed.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class PrefillTarget:
    worker_id: str
    address: str


@dataclass
class Timings:
    queue: float = 0.0
    prefill: float = 0.0
    transfer: float = 0.0
    decode: float = 0.0
    transfer_bytes: int = 0


@dataclass(frozen=True)
class Chunk:
    """New tokens of one request; the last chunk carries finish, usage and timings."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish: RequestStatus | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: Timings | None = None


@dataclass(frozen=True)
class _RemotePrefill:
    first_token: int
    logprobs: TokenLogprobs | None
    cached_tokens: int
    timings: Timings


class DecodeWorker:
    def __init__(self, config: WorkerConfig, host: EngineHost, metrics: WorkerMetrics) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.transfer: TransferServer | None = None
        self.pending: PendingTransfers | None = None
        self.draining = False
        self.in_flight = 0
        self._transfer_ids = itertools.count(1)
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def transfer_endpoint(self) -> str:
        """The rendezvous address prefill workers connect to (a wildcard bind is advertised under
        this worker's advertised host)."""
        if self.transfer is None:
            return ""
        host = self.transfer.endpoint.host
        if host in ("", "0.0.0.0", "::"):
            host = self.config.advertised(0).rsplit(":", 1)[0]
        return f"{host}:{self.transfer.endpoint.port}"

    async def start(self) -> None:
        self.host.start()
        self.pending = PendingTransfers(asyncio.get_running_loop())
        engine = self.host.engine
        layout = KVLayout.from_kv_cache(engine.runner.kv_cache, self.host.model_name)
        self.transfer = TransferServer(
            self.config.worker_id,
            self.config.transfer_listen,
            layout,
            engine.runner.kv_cache,
            resolve=self.pending.resolve,
            on_complete=self.pending.complete,
            on_error=self.pending.fail,
            config=self.config.channel_config(),
        )
        self.metrics.watch_transfer_refusals(
            lambda: self.transfer.counters.snapshot().refused if self.transfer else 0
        )

    async def stop(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self.transfer is not None:
            self.transfer.close()
        self.host.stop()

    # ---- the request path ----------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        targets: tuple[PrefillTarget, ...] = (),
    ) -> AsyncGenerator[Chunk, None]:
        if self.draining:
            raise Unavailable(f"decode worker {self.config.worker_id} is draining")
        req = self.host.engine.make_request(request_id, prompt_token_ids, params, priority)
        self.in_flight += 1
        try:
            if targets:
                async for chunk in self._disaggregated(req, targets):
                    yield chunk
            else:
                async for chunk in self._local(req):
                    yield chunk
        finally:
            self.in_flight -= 1

    async def _local(self, req: Request) -> AsyncIterator[Chunk]:
        async for event in self.host.aengine.add_and_stream(req):
            yield self._chunk(req, event.token_id, event.logprobs, event.finished, None)

    async def _disaggregated(self, req: Request, targets: tuple[PrefillTarget, ...]) -> AsyncIterator[Chunk]:
        aengine = self.host.aengine
        try:
            reserved = await aengine.submit(lambda e: e.scheduler.reserve_remote(req))
        except asyncio.CancelledError:
            aengine.abort(req.request_id)  # queued behind the reservation: frees it if it was made
            raise
        if not reserved:
            self.metrics.requests.labels("no_kv_room").inc()
            raise ResourceExhausted(
                f"not enough free KV blocks for a {req.num_prompt_tokens}-token prompt "
                f"({self.host.engine.num_free_blocks} of {self.host.engine.blocks.num_blocks} blocks free)"
            )
        events = aengine.open_stream(req)
        finished = False
        try:
            remote = await self._remote_prefill(req, targets)
            if remote is None:  # every prefill worker failed: recompute here
                aengine.close_stream(req)
                await aengine.submit(lambda e: e.abort_request(req.request_id))
                fresh = self.host.engine.make_request(
                    req.request_id, req.prompt_token_ids, req.sampling_params, req.priority
                )
                async for chunk in self._local(fresh):
                    finished = chunk.finish is not None
                    yield chunk
                return

            def land(engine):  # type: ignore[no-untyped-def]
                if remote.logprobs is not None:
                    req.logprobs.append(remote.logprobs)
                return engine.scheduler.remote_kv_ready(req.request_id, remote.first_token)

            await aengine.submit(land)
            req.num_cached_tokens = remote.cached_tokens
            finished = req.status.finished
            yield self._chunk(req, remote.first_token, remote.logprobs, finished, remote.timings)
            if finished:
                return
            async for event in aengine.iterate(events):
                finished = event.finished
                yield self._chunk(req, event.token_id, event.logprobs, event.finished, remote.timings)
        finally:
            aengine.close_stream(req)
            if not finished:
                aengine.abort(req.request_id)

    async def _remote_prefill(
        self, req: Request, targets: tuple[PrefillTarget, ...]
    ) -> _RemotePrefill | None:
        """Ask each target in turn; None when all failed and the fallback is to recompute here."""
        assert self.transfer is not None and self.pending is not None
        errors: list[str] = []
        skip = req.num_cached_tokens // self.host.engine.block_size  # our own prefix-cache hits
        blocks = req.block_ids[skip:]
        for target in targets:
            transfer_id = next(self._transfer_ids)
            landed = self.pending.expect(transfer_id, blocks)
            try:
                self.transfer.open(target.worker_id)
                started = time.monotonic()
                reply = await self._stub(target.address).Prefill(
                    worker_pb2.PrefillRequest(
                        request_id=req.request_id,
                        prompt_token_ids=req.prompt_token_ids,
                        sampling=sampling_to_proto(req.sampling_params),
                        priority=req.priority,
                        prefill_worker_id=target.worker_id,
                        destination=worker_pb2.KVDestination(
                            decode_worker_id=self.config.worker_id,
                            transfer_endpoint=self.transfer_endpoint,
                            transfer_id=transfer_id,
                            skip_blocks=skip,
                            block_ids=blocks,
                        ),
                    ),
                    timeout=self.config.prefill_timeout_s,
                    metadata=self.config.security.load().metadata,
                )
                stats = await asyncio.wait_for(landed, timeout=self.config.transfer_timeout_s)
            except asyncio.CancelledError:
                await asyncio.shield(self.pending.cancel(transfer_id))
                raise
            except grpc.aio.AioRpcError as exc:
                await self.pending.cancel(transfer_id)
                if exc.code() not in _RETRYABLE:
                    raise
                errors.append(f"{target.worker_id}: {exc.code().name} {exc.details()}")
            except Exception as exc:  # transfer failed or timed out
                await self.pending.cancel(transfer_id)
                self.metrics.transfer_failures.inc()
                self.transfer.abort_channel(target.worker_id, f"transfer {transfer_id} failed: {exc}")
                errors.append(f"{target.worker_id}: {type(exc).__name__} {exc}")
            else:
                self.metrics.transfer_bytes.labels("in").inc(stats.bytes)
                self.metrics.transfer_seconds.labels("in").inc(stats.seconds)
                timings = Timings(
                    queue=(started - req.arrival_time) + reply.queue_seconds,
                    prefill=reply.prefill_seconds,
                    transfer=reply.transfer_seconds,
                    transfer_bytes=stats.bytes,
                )
                logprobs = (
                    logprobs_from_proto(reply.first_token_logprobs)
                    if reply.HasField("first_token_logprobs")
                    else None
                )
                return _RemotePrefill(reply.first_token_id, logprobs, reply.cached_prompt_tokens, timings)
            log.warning("prefill of %s failed: %s", req.request_id, errors[-1])
        if self.config.prefill_fallback is PrefillFallback.FAIL:
            raise Unavailable("every prefill worker failed: " + "; ".join(errors))
        log.warning("recomputing %s locally after %d failed prefill attempt(s)", req.request_id, len(errors))
        return None

    # ---- helpers -------------------------------------------------------------------------

    def _chunk(
        self,
        req: Request,
        token: int | None,
        logprobs: TokenLogprobs | None,
        finished: bool,
        remote: Timings | None,
    ) -> Chunk:
        tokens = [token] if token is not None else []
        lps = [logprobs] if logprobs is not None else []
        if not finished:
            return Chunk(tokens, lps)
        now = time.monotonic()
        first = req.first_token_time or now
        if remote is not None:
            timings = Timings(
                remote.queue, remote.prefill, remote.transfer, now - first, remote.transfer_bytes
            )
        else:
            scheduled = req.scheduled_time or req.arrival_time
            timings = Timings(
                queue=scheduled - req.arrival_time, prefill=first - scheduled, decode=now - first
            )
        self._observe(req, now)
        return Chunk(
            tokens,
            lps,
            req.status,
            req.num_prompt_tokens,
            req.num_output_tokens,
            req.num_cached_tokens,
            timings,
        )

    def _observe(self, req: Request, now: float) -> None:
        self.metrics.requests.labels(req.status.name.lower()).inc()
        if req.first_token_time is not None:
            self.metrics.ttft.observe(req.first_token_time - req.arrival_time)
            if req.num_output_tokens > 1:
                self.metrics.tpot.observe((now - req.first_token_time) / (req.num_output_tokens - 1))

    def _stub(self, address: str) -> worker_pb2_grpc.PrefillWorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.config.security.load().channel(address)
            self._channels[address] = channel
        return worker_pb2_grpc.PrefillWorkerStub(channel)
