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

from scalellm.engine.events import FinishedRequest, RemoteReservation, TokenEvent
from scalellm.engine.request import Request
from scalellm.transfer import KVLayout, TransferServer
from scalellm.types import (
    DEFAULT_TENANT,
    FinishReason,
    KVDestination,
    PrefillResult,
    PrefillTarget,
    SamplingParams,
    TenantShare,
    Timings,
    TokenLogprobs,
    Usage,
)
from scalellm.types.proto import (
    kv_destination_to_proto,
    prefill_result_from_proto,
    sampling_to_proto,
)
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from scalellm.worker.config import PrefillFallback, WorkerConfig
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
class Chunk:
    """New tokens of one request; the last chunk carries finish, usage and timings."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    """With the first token, when the request asked for them (prompt tokens 1..)."""


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
        # Pushed KV carries all the model's heads; a tensor-parallel engine lands it beside its
        # cache and scatters each rank its heads (LLMEngine.kv_landing, scatter_kv)
        landing = engine.kv_landing()
        layout = KVLayout.from_kv_cache(landing, self.host.model_name)
        self.transfer = TransferServer(
            self.config.worker_id,
            self.config.transfer_listen,
            layout,
            landing,
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
        resume_token_ids: tuple[int, ...] = (),
        *,
        tenant: TenantShare = DEFAULT_TENANT,
    ) -> AsyncGenerator[Chunk, None]:
        """The request's chunks. resume_token_ids: a migrated request's output so far (it is
        computed here with the prompt, so it never goes to a prefill worker)."""
        if self.draining:
            raise Unavailable(f"decode worker {self.config.worker_id} is draining")
        if resume_token_ids and targets:
            raise ValueError("a resumed request is computed locally: give no prefill targets")
        req = await self.host.make_request(
            request_id, prompt_token_ids, params, priority, resume_token_ids=resume_token_ids, tenant=tenant
        )
        self.in_flight += 1
        try:
            # Prompt logprobs come from the prefill's logits: such a request is prefilled here.
            if targets and params.prompt_logprobs is None:
                async for chunk in self._disaggregated(req, targets):
                    yield chunk
            else:
                async for chunk in self._local(req):
                    yield chunk
        finally:
            self.in_flight -= 1

    async def _local(self, req: Request) -> AsyncIterator[Chunk]:
        async for event in self.host.aengine.add_and_stream(req):
            yield self._chunk(event, None)

    async def _disaggregated(self, req: Request, targets: tuple[PrefillTarget, ...]) -> AsyncIterator[Chunk]:
        aengine = self.host.aengine
        try:
            reservation = await aengine.reserve_remote(req)
        except asyncio.CancelledError:
            aengine.abort(req.request_id)  # queued behind the reservation: frees it if it was made
            raise
        if reservation is None:
            self.metrics.requests.labels("no_kv_room").inc()
            stats = aengine.stats
            raise ResourceExhausted(
                f"not enough free KV blocks for a {req.num_prompt_tokens}-token prompt "
                f"({stats.num_free_blocks} of {stats.num_blocks} blocks free)"
            )
        events = aengine.open_stream(req)
        finished = False
        try:
            remote = await self._remote_prefill(req, reservation, targets)
            if remote is None:  # every prefill worker failed: recompute here
                aengine.close_stream(req)
                await aengine.abort(req.request_id)
                fresh = await self.host.make_request(
                    req.request_id, req.prompt_token_ids, req.sampling_params, req.priority, tenant=req.tenant
                )
                async for chunk in self._local(fresh):
                    finished = chunk.finish is not None
                    yield chunk
                return
            result, timings = remote
            await aengine.scatter_kv(list(reservation.block_ids))
            first = await aengine.remote_kv_landed(
                req.request_id, result.first_token_id, result.logprobs, result.cached_tokens
            )
            finished = first.finished
            yield self._chunk(first, timings)
            if finished:
                return
            async for event in aengine.iterate(events):
                finished = event.finished
                yield self._chunk(event, timings)
        finally:
            aengine.close_stream(req)
            if not finished:
                aengine.abort(req.request_id)

    async def _remote_prefill(
        self, req: Request, reservation: RemoteReservation, targets: tuple[PrefillTarget, ...]
    ) -> tuple[PrefillResult, Timings] | None:
        """Ask each target in turn; None when all failed and the fallback is to recompute here."""
        assert self.transfer is not None and self.pending is not None
        errors: list[str] = []
        for target in targets:
            transfer_id = next(self._transfer_ids)
            landed = self.pending.expect(transfer_id, list(reservation.block_ids))
            destination = KVDestination(
                self.config.worker_id,
                self.transfer_endpoint,
                transfer_id,
                reservation.skip_blocks,
                reservation.block_ids,
            )
            try:
                self.transfer.open(target.worker_id)
                started = time.monotonic()
                reply = await self._stub(target.address).Prefill(
                    worker_pb2.PrefillRequest(
                        request_id=req.request_id,
                        prompt_token_ids=req.prompt_token_ids,
                        sampling=sampling_to_proto(req.sampling_params),
                        priority=req.priority,
                        tenant=req.tenant.name,
                        tenant_weight=req.tenant.weight,
                        prefill_worker_id=target.worker_id,
                        destination=kv_destination_to_proto(destination),
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
                result = prefill_result_from_proto(reply)
                timings = Timings(
                    queue=(started - req.arrival_time) + result.queue_seconds,
                    prefill=result.prefill_seconds,
                    transfer=result.transfer_seconds,
                    transfer_bytes=stats.bytes,
                )
                return result, timings
            log.warning("prefill of %s failed: %s", req.request_id, errors[-1])
        if self.config.prefill_fallback is PrefillFallback.FAIL:
            raise Unavailable("every prefill worker failed: " + "; ".join(errors))
        log.warning("recomputing %s locally after %d failed prefill attempt(s)", req.request_id, len(errors))
        return None

    # ---- helpers -------------------------------------------------------------------------

    def _chunk(self, event: TokenEvent, remote: Timings | None) -> Chunk:
        """The event as a chunk; on the last event with usage and timings (remote: what the
        prefill hop took, for a request whose KV was pushed)."""
        tokens = [event.token_id] if event.token_id is not None else []
        lps = [event.logprobs] if event.logprobs is not None else []
        prompt_lps = event.prompt_logprobs or ()
        done = event.outcome
        if done is None:
            return Chunk(tokens, lps, prompt_logprobs=prompt_lps)
        now = time.monotonic()
        first = done.first_token_time or now
        if remote is not None:
            timings = Timings(
                queue=remote.queue,
                prefill=remote.prefill,
                transfer=remote.transfer,
                decode=now - first,
                transfer_bytes=remote.transfer_bytes,
            )
        else:
            scheduled = done.scheduled_time or done.arrival_time
            timings = Timings(
                queue=scheduled - done.arrival_time, prefill=first - scheduled, decode=now - first
            )
        self._observe(done, now)
        return Chunk(tokens, lps, done.finish_reason, done.usage, timings, prompt_lps)

    def _observe(self, done: FinishedRequest, now: float) -> None:
        self.metrics.requests.labels(done.status.name.lower()).inc()
        if done.first_token_time is not None:
            self.metrics.ttft.observe(done.first_token_time - done.arrival_time)
            generated = done.num_output_tokens - done.resumed_tokens  # a migrated request's own
            if generated > 1:
                self.metrics.tpot.observe((now - done.first_token_time) / (generated - 1))

    def _stub(self, address: str) -> worker_pb2_grpc.PrefillWorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.config.security.load().channel(address)
            self._channels[address] = channel
        return worker_pb2_grpc.PrefillWorkerStub(channel)
