"""Prefill side of a pair channel: a FIFO of transfers pushed by one sender thread."""

from __future__ import annotations

import collections
import logging
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
from scalellm.transfer.stream import send_transfer
from scalellm.transfer.wire import HEADER_BYTES, Blocks, Header, choose_layers_per_group, payload_bytes

log = logging.getLogger(__name__)


@dataclass
class _Job:
    transfer_id: int
    kv_cache: torch.Tensor
    block_ids: list[int]
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
        self, transfer_id: int, kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int
    ) -> Future[TransferStats]:
        """Queue a transfer. The blocks must stay untouched until the future resolves."""
        job = _Job(transfer_id, kv_cache, list(block_ids), num_tokens)
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
        self, transfer_id: int, kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int
    ) -> TransferStats:
        """Blocking :meth:`submit_kv` (call it from a worker thread, never an event loop)."""
        return self.submit_kv(transfer_id, kv_cache, block_ids, num_tokens).result()

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
                self._layout.check_cache(job.kv_cache)
                if job.kv_cache.device != self._device:
                    raise ValueError(f"kv_cache is on {job.kv_cache.device}, the channel on {self._device}")
                blocks = Blocks.build(job.block_ids, job.num_tokens, job.kv_cache)
            except ValueError as exc:  # a bad request, not a broken channel
                job.future.set_exception(exc)
                continue
            try:
                job.future.set_result(self._send(job, blocks))
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

    def _send(self, job: _Job, blocks: Blocks) -> TransferStats:
        link = self._rendezvous.link()
        self.state = ChannelState.READY
        start = time.perf_counter()
        push(link.store, ControlMessage(Control.SEND, job.transfer_id))
        num_blocks = len(blocks.ids)
        per_group = choose_layers_per_group(self._layout, num_blocks, self._config)
        nbytes = payload_bytes(self._layout, num_blocks)
        header = Header(
            link.seq, job.transfer_id, job.num_tokens, num_blocks, self._layout.num_layers, per_group, nbytes
        )
        link.seq += 1
        send_transfer(link.group, header, self._layout, job.kv_cache, blocks, link.pool, self._config)
        stats = TransferStats(
            job.transfer_id, job.num_tokens, num_blocks, HEADER_BYTES + nbytes, time.perf_counter() - start
        )
        self._counters.record(stats)
        return stats
