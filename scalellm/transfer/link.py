"""Prefill side of the rendezvous: find the decode side's current epoch, claim it, join it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import ChannelBrokenError
from scalellm.transfer.group import PREFILL_RANK, PairGroup, open_pair_group
from scalellm.transfer.layout import KVLayout, LayoutMismatchError
from scalellm.transfer.rendezvous import (
    CLAIM_KEY,
    GROUP_PREFIX,
    LAYOUT_KEYS,
    Control,
    ControlMessage,
    Endpoint,
    PairKeys,
    push,
    wait_key,
)
from scalellm.transfer.wire import BufferPool


@dataclass
class Link:
    """A joined epoch: its store view, process group and wire buffers."""

    epoch: int
    store: dist.Store
    group: PairGroup
    pool: BufferPool
    seq: int = 0


class PrefillRendezvous:
    """Keeps one prefill worker joined to one decode worker's current epoch. Not thread-safe:
    the channel's sender thread is its only user."""

    def __init__(
        self,
        keys: PairKeys,
        endpoint: Endpoint,
        layout: KVLayout,
        device: torch.device,
        config: ChannelConfig,
    ) -> None:
        self.keys, self.endpoint = keys, endpoint
        self._layout, self._device, self._config = layout, device, config
        self._store: dist.TCPStore | None = None
        self._link: Link | None = None
        self._last_epoch = 0
        self._mismatch: tuple[int, LayoutMismatchError] | None = None

    def link(self) -> Link:
        """The current link, re-joining if the decode side moved to a newer epoch."""
        if self._store is None:
            # A TCPStore client retries for 2-3x its timeout before giving up: divide it.
            timeout = timedelta(seconds=max(1.0, self._config.connect_timeout_s / 3))
            self._store = dist.TCPStore(
                self.endpoint.host, self.endpoint.port, is_master=False, timeout=timeout
            )
            self._store.set_timeout(self._config.connect_timeout)
        if self._link is not None and self._store.add(self.keys.epoch_key, 0) == self._link.epoch:
            return self._link
        self.drop(None)
        self._link = self._join(self._store)
        return self._link

    def drop(self, notice: Control | None) -> None:
        """Tear the link down, telling the decode side (RESET after a failure, CLOSE on close)."""
        link, self._link = self._link, None
        if link is not None:
            if notice is not None:
                with contextlib.suppress(RuntimeError):  # the store may be what failed
                    push(link.store, ControlMessage(notice))
            link.group.abort()
        if notice is not None:
            self._store = None  # reconnect next time: the store may be what failed

    def _join(self, store: dist.TCPStore) -> Link:
        deadline = time.monotonic() + self._config.connect_timeout_s
        while True:
            epoch = store.add(self.keys.epoch_key, 0)
            if self._mismatch is not None and self._mismatch[0] == epoch:
                raise self._mismatch[1]
            if epoch > self._last_epoch:
                self._last_epoch = epoch
                view = self.keys.epoch_store(store, epoch)
                if view.add(CLAIM_KEY, 1) == 1:
                    return self._handshake(view, epoch)
                push(view, ControlMessage(Control.RESET))  # an earlier process of ours owned it
            left = deadline - time.monotonic()
            following = self.keys.epoch_store(store, self._last_epoch + 1)
            if left <= 0 or not wait_key(following, LAYOUT_KEYS[0], timedelta(seconds=left)):
                raise ChannelBrokenError(
                    f"decode worker {self.keys.decode_id} opened no channel for {self.keys.prefill_id} "
                    f"within {self._config.connect_timeout_s}s"
                )

    def _handshake(self, view: dist.Store, epoch: int) -> Link:
        view.set(LAYOUT_KEYS[1], self._layout.to_json())
        push(view, ControlMessage(Control.JOIN))
        peer = f"decode worker {self.keys.decode_id}"
        try:
            self._layout.check_compatible(KVLayout.from_json(view.get(LAYOUT_KEYS[0]), peer), peer)
        except LayoutMismatchError as exc:
            self._mismatch = (epoch, exc)  # refuse at once until the decode side opens a new epoch
            raise
        group = open_pair_group(
            dist.PrefixStore(GROUP_PREFIX, view), PREFILL_RANK, self._device, self._config
        )
        return Link(epoch, view, group, BufferPool(group.wire_device))
