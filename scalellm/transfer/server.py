"""Decode-side manager: hosts the rendezvous store and one receiving channel per prefill worker."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

import torch
import torch.distributed as dist

from scalellm.transfer.auth import AUTH_KEY, NO_AUTH, NONCE_KEY, SCHEME, new_nonce
from scalellm.transfer.channel import CompleteCallback, ErrorCallback, ReceiverCallbacks, Resolver
from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import ChannelBrokenError, ChannelClosedError
from scalellm.transfer.layout import KVLayout
from scalellm.transfer.receiver import DecodeChannel, DecodeSide
from scalellm.transfer.rendezvous import LAYOUT_KEYS, Endpoint, PairKeys
from scalellm.transfer.stats import TransferCounters

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class TransferServer:
    """Receives pushed KV for one decode worker.

    Hosts a ``TCPStore`` on ``endpoint`` (port 0 picks a free one; read :attr:`endpoint`), which
    the worker advertises in the registry. Callbacks run on receiver threads. The store serves
    on a socket we bind to ``endpoint``'s host (torch's own would take every interface).
    """

    def __init__(
        self, worker_id: str, endpoint: str | Endpoint, layout: KVLayout, kv_cache: torch.Tensor,
        resolve: Resolver, on_complete: CompleteCallback, on_error: ErrorCallback,
        config: ChannelConfig | None = None,
    ) -> None:  # fmt: skip
        layout.check_cache(kv_cache)
        config = config or ChannelConfig()
        where = Endpoint.parse(endpoint)
        if config.device_host is None and where.host not in _WILDCARD_HOSTS:
            config = dataclasses.replace(config, device_host=where.host)
        self.worker_id = worker_id
        self.counters = TransferCounters()
        self._side = DecodeSide(
            layout, kv_cache, ReceiverCallbacks(resolve, on_complete, on_error), self.counters, config
        )
        listener = _listen(where)
        self._store: dist.TCPStore | None = dist.TCPStore(
            where.host or "0.0.0.0",
            listener.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=config.connect_timeout,
            master_listen_fd=listener.detach(),  # the store owns (and closes) the socket now
        )
        self.endpoint = Endpoint(where.host, self._store.port)
        self._lock = threading.Lock()
        self._channels: dict[str, DecodeChannel] = {}
        self._retired: list[DecodeChannel] = []

    def open(self, prefill_id: str) -> DecodeChannel:
        """The live channel for ``prefill_id``, opening a new epoch if there is none. Does not
        wait for the peer (it joins on its first send); see :meth:`DecodeChannel.wait_ready`."""
        with self._lock:
            if self._store is None:
                raise ChannelClosedError(f"transfer server {self.worker_id} is closed")
            current = self._channels.get(prefill_id)
            if current is not None and current.state.alive:
                return current
            if current is not None:
                self._retired.append(current)
            keys = PairKeys(self.worker_id, prefill_id)
            epoch = self._store.add(keys.epoch_key, 1)
            view, nonce = keys.epoch_store(self._store, epoch), new_nonce()
            view.set(NONCE_KEY, nonce)
            view.set(AUTH_KEY, SCHEME if self._side.config.auth_key else NO_AUTH)
            view.set(LAYOUT_KEYS[0], self._side.layout.to_json())  # last: it announces the epoch
            channel = DecodeChannel(self._side, keys, epoch, nonce, self._store, self._reopen)
            self._channels[prefill_id] = channel
            self._retired = [c for c in self._retired if c.running]
            return channel

    def channel(self, prefill_id: str) -> DecodeChannel | None:
        """The current channel for ``prefill_id``, alive or not, without opening one."""
        with self._lock:
            return self._channels.get(prefill_id)

    def abort_channel(self, prefill_id: str, reason: str = "aborted by the decode worker") -> None:
        """Break the channel (e.g. the registry says the peer is gone); the next open() rebuilds."""
        channel = self.channel(prefill_id)
        if channel is not None:
            channel.abort(ChannelBrokenError(reason))

    def close(self) -> None:
        """Close every channel, join their threads and stop the store."""
        with self._lock:
            if self._store is None:
                return
            channels = [*self._channels.values(), *self._retired]
            self._channels.clear()
            self._retired.clear()
            store, self._store = self._store, None
        timeout = self._side.config.op_timeout_s + self._side.config.connect_timeout_s
        for channel in channels:
            channel.close(timeout)
        del store  # the last reference: the store's server thread and socket go with it

    def __enter__(self) -> TransferServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reopen(self, channel: DecodeChannel) -> None:
        """A new prefill process asked for a fresh epoch: give it one at once."""
        with self._lock:
            stale = self._store is None or self._channels.get(channel.prefill_id) is not channel
        if not stale:
            try:
                self.open(channel.prefill_id)
            except (ChannelClosedError, RuntimeError) as exc:
                log.warning("could not reopen channel for %s: %s", channel.prefill_id, exc)


def _listen(where: Endpoint) -> socket.socket:
    """A listening socket on exactly ``where`` (an empty host or a wildcard: every interface)."""
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    try:
        return socket.create_server((where.host or "0.0.0.0", where.port), family=family, backlog=128)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind the KV transfer endpoint {where}: {exc.strerror}") from exc
