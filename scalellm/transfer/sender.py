"""Prefill side of a pair channel: a FIFO of transfers pushed by one sender thread."""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from scalellm.transfer.channel import ChannelState
from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import ChannelClosedError, TransferError, as_transfer_error
from scalellm.transfer.layout import KVLayout
from scalellm.transfer.link import PrefillRendezvous
from scalellm.transfer.rendezvous import Control, ControlMessage, Endpoint, PairKeys, push
from scalellm.transfer.stats import TransferCounters, TransferStats
from scalellm.transfer.stream import send_payload
from scalellm.transfer.wire import Frame, Segment, check_block_ids, plan_segments

log = logging.getLogger(__name__)


@dataclass
class _Job:
    transfer_id: int
    kv_cache: torch.Tensor
    src_blocks: list[int]
    dst_blocks: list[int]
    num_tokens: int
    future: Future[TransferStats] = field(default_factory=Future)


class PrefillChannel:
    """Pushes KV to one decode worker. Transfers go out one at a time, in submission order."""

    def __init__(
        self, worker_id: str, decode_id: str, endpoint: Endpoint, layout: KVLayout, device: torch.device,
        counters: TransferCounters, config: ChannelConfig,
    ) -> None:  # fmt: skip
        self.keys, self.endpoint = PairKeys(decode_id, worker_id), endpoint
        self._layout, self._device, self._counters, self._config = layout, device, counters, config
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rendezvous = PrefillRendezvous(self.keys, endpoint, layout, device, config)
        self.state = ChannelState.CONNECTING

    def submit_kv(
        self, transfer_id: int, kv_cache: torch.Tensor, src_blocks: list[int], dst_blocks: list[int],
        num_tokens: int,
    ) -> Future[TransferStats]:  # fmt: skip
        """Queue a transfer of ``num_tokens`` tokens' KV from our ``src_blocks`` into the decode
        worker's ``dst_blocks`` (same length, in token order). The source blocks must stay
        untouched until the future resolves."""
        job = _Job(transfer_id, kv_cache, list(src_blocks), list(dst_blocks), num_tokens)
        with self._cond:
            if self._closed:
                raise ChannelClosedError(f"channel to {self.keys.decode_id} is closed")
            self._jobs.append(job)
            if self._thread is None:
                name = f"kv-send-{self.keys.decode_id}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return job.future

    def send_kv(
        self, transfer_id: int, kv_cache: torch.Tensor, src_blocks: list[int], dst_blocks: list[int],
        num_tokens: int,
    ) -> TransferStats:  # fmt: skip
        """Blocking :meth:`submit_kv` (call it from a worker thread, never an event loop)."""
        return self.submit_kv(transfer_id, kv_cache, src_blocks, dst_blocks, num_tokens).result()

    def close(self, timeout: float | None = None) -> None:
        """Finish the transfer in flight, fail queued ones, tell the decode side, drop the link."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._jobs)
            self._jobs.clear()
            self._cond.notify()
        self._fail(queued, ChannelClosedError(f"channel to {self.keys.decode_id} was closed"))
        if self._thread is not None:
            self._thread.join(timeout)
        self._rendezvous.drop(Control.CLOSE)
        self.state = ChannelState.CLOSED

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._send(job))
            except ValueError as exc:  # a bad request, not a broken channel
                job.future.set_exception(exc)
            except (TransferError, RuntimeError) as exc:
                error = as_transfer_error(
                    exc, f"KV transfer {job.transfer_id} to {self.keys.decode_id} failed"
                )
                log.warning("%s", error)
                self._rendezvous.drop(Control.RESET)
                self.state = ChannelState.BROKEN
                with self._cond:
                    queued = list(self._jobs)
                    self._jobs.clear()
                self._fail([job, *queued], error)

    def _next_job(self) -> _Job | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            return self._jobs.popleft() if self._jobs else None

    def _fail(self, jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            self._counters.record_failure()
            if not job.future.done():
                job.future.set_exception(exc)

    def _send(self, job: _Job) -> TransferStats:
        self._layout.check_cache(job.kv_cache)
        if job.kv_cache.device != self._device:
            raise ValueError(f"kv_cache is on {job.kv_cache.device}, the channel on {self._device}")
        # Join (and compare layouts) before judging the block ids: a peer with another block size
        # sends block counts that look wrong, and the layout mismatch is the error that explains it.
        link = self._rendezvous.link()
        self.state = ChannelState.READY
        segments = _plan(
            job, self._layout.block_size, max(1, self._config.message_bytes // self._layout.block_bytes)
        )
        start = time.perf_counter()
        frame = Frame.build(link.seq, job.num_tokens, segments, self._layout)
        push(link.store, link.seal(ControlMessage(Control.SEND, job.transfer_id, frame.encode())))
        link.seq += 1
        send_payload(link.group, segments, job.kv_cache, link.pool)
        stats = TransferStats(
            job.transfer_id,
            job.num_tokens,
            frame.num_blocks,
            frame.payload_bytes,
            time.perf_counter() - start,
        )
        self._counters.record(stats)
        return stats


def _plan(job: _Job, block_size: int, max_blocks: int) -> list[Segment]:
    """Validate the job's block ids and cut them into segments; ``ValueError`` if they are bad."""
    check_block_ids(job.src_blocks, job.num_tokens, block_size, job.kv_cache.shape[0])
    if len(job.dst_blocks) != len(job.src_blocks):
        raise ValueError(f"{len(job.dst_blocks)} destination blocks for {len(job.src_blocks)} source blocks")
    # Distinct and one per block; only the receiver knows its capacity, so it checks the range.
    check_block_ids(job.dst_blocks, job.num_tokens, block_size, capacity=sys.maxsize)
    return plan_segments(job.src_blocks, job.dst_blocks, max_blocks)
