"""Prefill side of the rendezvous: find the decode side's current epoch, claim it, join it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scalellm.transfer.auth import (
    AUTH_KEY,
    NONCE_KEY,
    SCHEME,
    VERDICT_KEY,
    EpochKey,
    PairSession,
    Transcript,
    new_nonce,
)
from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import AuthenticationError, ChannelBrokenError, TransferError
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
    """A joined epoch: its store view, process group and wire buffers (and, with a mesh token,
    what its control messages are sealed with)."""

    epoch: int
    store: dist.Store
    group: PairGroup
    pool: BufferPool
    session: PairSession | None = None
    epoch_key: EpochKey | None = None
    seq: int = 0

    def seal(self, msg: ControlMessage) -> ControlMessage:
        """``msg`` as the decode side accepts it on this epoch."""
        if msg.kind is Control.RESET and self.epoch_key is not None:
            return self.epoch_key.reset()
        return self.session.seal(msg) if self.session is not None else msg


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
        self._mismatch: tuple[int, TransferError] | None = None
        """A layout or token mismatch with an epoch: refused at once until the decode side opens
        a new one."""

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
                    push(link.store, link.seal(ControlMessage(notice)))
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
                push(view, self._reset(view, epoch))  # an earlier process of ours owned it
            left = deadline - time.monotonic()
            following = self.keys.epoch_store(store, self._last_epoch + 1)
            if left <= 0 or not wait_key(following, LAYOUT_KEYS[0], timedelta(seconds=left)):
                raise ChannelBrokenError(
                    f"decode worker {self.keys.decode_id} opened no channel for {self.keys.prefill_id} "
                    f"within {self._config.connect_timeout_s}s"
                )

    def _reset(self, view: dist.Store, epoch: int) -> ControlMessage:
        key = self._config.auth_key
        if key is None:
            return ControlMessage(Control.RESET)
        return EpochKey(key, self.keys, epoch, view.get(NONCE_KEY).decode()).reset()

    def _handshake(self, view: dist.Store, epoch: int) -> Link:
        layout = self._layout.to_json()
        view.set(LAYOUT_KEYS[1], layout)
        peer = f"decode worker {self.keys.decode_id}"
        try:
            transcript = self._join_message(view, epoch, layout.encode(), peer)
            self._layout.check_compatible(KVLayout.from_json(view.get(LAYOUT_KEYS[0]), peer), peer)
            session = self._verdict(view, transcript, peer)
        except (LayoutMismatchError, AuthenticationError) as exc:
            self._mismatch = (epoch, exc)  # refuse at once until the decode side opens a new epoch
            raise
        store = dist.PrefixStore(GROUP_PREFIX, view)
        group = open_pair_group(
            session.signed(store) if session else store, PREFILL_RANK, self._device, self._config
        )
        if session is not None:
            try:
                session.prove_group(group)
            except TransferError:
                group.abort()
                raise
        key = self._config.auth_key
        epoch_key = EpochKey(key, self.keys, epoch, transcript.nonce0) if transcript and key else None
        return Link(epoch, view, group, BufferPool(group.wire_device), session, epoch_key)

    def _join_message(self, view: dist.Store, epoch: int, layout: bytes, peer: str) -> Transcript | None:
        """Push our JOIN (tagged when we hold a key); refuse a decode side that does not match us."""
        key, required = self._config.auth_key, view.get(AUTH_KEY).decode() == SCHEME
        if key is None:
            push(view, ControlMessage(Control.JOIN))
            if required:
                raise AuthenticationError(f"{peer} requires the mesh token, and this worker has none")
            return None
        if not required:
            push(view, ControlMessage(Control.CLOSE))  # the decode side ends the epoch at once
            raise AuthenticationError(
                f"{peer} does not authenticate KV transfers (no mesh token) but this worker does: "
                "give both the same token"
            )
        nonce0 = view.get(NONCE_KEY).decode()
        transcript = Transcript(self.keys, epoch, nonce0, new_nonce(), view.get(LAYOUT_KEYS[0]), layout)
        push(view, transcript.join(key))
        return transcript

    def _verdict(self, view: dist.Store, transcript: Transcript | None, peer: str) -> PairSession | None:
        """The decode side's answer to our JOIN: the session, or AuthenticationError."""
        key = self._config.auth_key
        if transcript is None or key is None:
            return None
        verdict = view.get(VERDICT_KEY).decode()  # waits up to connect_timeout_s
        if not transcript.verdict_is_valid(key, verdict):
            raise AuthenticationError(
                f"{peer} refused our KV channel or could not prove the mesh token (do both hold the same one?)"
            )
        return transcript.session(key)
