"""Prefill-side manager: one sending channel per decode worker, opened on first use."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import ChannelClosedError
from scalellm.transfer.layout import KVLayout
from scalellm.transfer.rendezvous import Endpoint
from scalellm.transfer.sender import PrefillChannel
from scalellm.transfer.stats import TransferCounters, TransferStats


class TransferClient:
    """Pushes this prefill worker's KV to decode workers, given their id and transfer endpoint."""

    def __init__(
        self, worker_id: str, layout: KVLayout, kv_cache: torch.Tensor, config: ChannelConfig | None = None
    ) -> None:
        layout.check_cache(kv_cache)
        self.worker_id, self.layout, self.kv_cache = worker_id, layout, kv_cache
        self.config = config or ChannelConfig()
        self.counters = TransferCounters()
        self._lock = threading.Lock()
        self._channels: dict[str, PrefillChannel] = {}
        self._closed = False

    def channel(self, decode_id: str, endpoint: str | Endpoint) -> PrefillChannel:
        """The channel to ``decode_id`` (created lazily; replaced if its endpoint changed)."""
        where = Endpoint.parse(endpoint)
        with self._lock:
            if self._closed:
                raise ChannelClosedError(f"transfer client {self.worker_id} is closed")
            current = self._channels.get(decode_id)
            if current is not None and current.endpoint == where:
                return current
            fresh = PrefillChannel(
                self.worker_id,
                decode_id,
                where,
                self.layout,
                self.kv_cache.device,
                self.counters,
                self.config,
            )
            self._channels[decode_id] = fresh
        if current is not None:
            current.close()
        return fresh

    def submit_kv(
        self,
        decode_id: str,
        endpoint: str | Endpoint,
        transfer_id: int,
        src_blocks: list[int],
        dst_blocks: list[int],
        num_tokens: int,
        source: torch.Tensor | None = None,
    ) -> Future[TransferStats]:
        """Queue the KV of ``num_tokens`` tokens in our ``src_blocks`` for ``decode_id``'s
        ``dst_blocks`` (see :meth:`PrefillChannel.submit_kv`). ``source``: blocks of this
        layout to send from instead of the cache (a tensor-parallel worker's gathered heads)."""
        if source is not None:
            self.layout.check_cache(source)
        channel = self.channel(decode_id, endpoint)
        kv = self.kv_cache if source is None else source
        return channel.submit_kv(transfer_id, kv, src_blocks, dst_blocks, num_tokens)

    def send_kv(
        self,
        decode_id: str,
        endpoint: str | Endpoint,
        transfer_id: int,
        src_blocks: list[int],
        dst_blocks: list[int],
        num_tokens: int,
    ) -> TransferStats:
        """Blocking :meth:`submit_kv`; call it from a worker thread."""
        return self.submit_kv(decode_id, endpoint, transfer_id, src_blocks, dst_blocks, num_tokens).result()

    def close(self) -> None:
        """Close every channel (in-flight transfers finish, queued ones fail)."""
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
