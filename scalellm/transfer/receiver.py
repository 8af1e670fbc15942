"""Decode side of a pair channel: one thread that joins the peer, then receives transfers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from scalellm.transfer.auth import DecodeGate
from scalellm.transfer.channel import ChannelState, LogThrottle, ReceiverCallbacks
from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import (
    AuthenticationError,
    ChannelBrokenError,
    ChannelClosedError,
    ProtocolError,
    TransferError,
    as_transfer_error,
)
from scalellm.transfer.group import DECODE_RANK, PairGroup, open_pair_group
from scalellm.transfer.layout import KVLayout
from scalellm.transfer.rendezvous import (
    GROUP_PREFIX,
    LAYOUT_KEYS,
    Control,
    ControlMessage,
    PairKeys,
    drain_controls,
    next_control,
    push,
)
from scalellm.transfer.stats import TransferCounters, TransferStats
from scalellm.transfer.stream import recv_payload
from scalellm.transfer.wire import BufferPool, Frame, check_block_ids

log = logging.getLogger(__name__)
_REFUSALS = LogThrottle(log, every_s=10.0)


class _ResetRequested(Exception):
    """A new prefill process asked for this epoch to be replaced."""


@dataclass(frozen=True)
class DecodeSide:
    """What every channel of one TransferServer shares."""

    layout: KVLayout
    kv_cache: torch.Tensor
    callbacks: ReceiverCallbacks
    counters: TransferCounters
    config: ChannelConfig


class DecodeChannel:
    """Receives the KV one prefill worker pushes, in FIFO order, on its own thread."""

    def __init__(
        self,
        side: DecodeSide,
        keys: PairKeys,
        epoch: int,
        nonce: str,
        store: dist.Store,
        on_reset: Callable[[DecodeChannel], None],
    ) -> None:
        self.prefill_id, self.epoch = keys.prefill_id, epoch
        self._gate = DecodeGate(side.config.auth_key, keys, epoch, nonce)
        self._side, self._on_reset = side, on_reset
        self._notify: dist.Store | None = keys.epoch_store(store, epoch)  # shared connection, wake-ups only
        # This thread's own connection (TCPStore.clone, which torch's stubs do not declare).
        self._store: dist.Store | None = keys.epoch_store(cast(Any, store).clone(), epoch)
        self._lock = threading.Lock()
        self._state = ChannelState.CONNECTING
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._group: PairGroup | None = None
        self._seq = 0
        self._pool: BufferPool | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"kv-recv-{keys.prefill_id}-{epoch}", daemon=True
        )
        self._thread.start()

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def running(self) -> bool:
        """Whether the receiver thread is still alive."""
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the peer joined; raise the channel's error if it failed instead."""
        if not self._ready.wait(timeout):
            raise TimeoutError(
                f"prefill worker {self.prefill_id} did not join epoch {self.epoch} in {timeout}s"
            )
        if self._error is not None:
            raise self._error
        if self._state is ChannelState.CLOSED:
            raise ChannelClosedError(f"channel to {self.prefill_id} was closed")

    def close(self, timeout: float | None = None) -> None:
        """Stop after the transfer in flight (if any); queued ones fail with ChannelClosedError."""
        with self._lock:
            if self._state is not ChannelState.CLOSED:
                self._state = ChannelState.CLOSED
                self._wake()
        self.join(timeout)

    def abort(self, reason: BaseException) -> None:
        """Break the channel now: the peer fails fast, the transfer in flight fails."""
        with self._lock:
            if not self._state.alive:
                return
            self._state, self._error = ChannelState.BROKEN, reason
            if self._group is not None:
                self._group.abort()
            self._wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the receiver thread; once it is gone, release the server's store too."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("receiver for %s still running after close", self.prefill_id)
        else:
            self._notify = None

    def _wake(self) -> None:
        try:
            if self._notify is not None:
                push(self._notify, ControlMessage(Control.CLOSE))
        except RuntimeError:  # the store is gone: the thread's own waits fail too
            pass

    def _run(self) -> None:
        reset = False
        try:
            if self._rendezvous():
                while (msg := self._next()) is not None:
                    self._receive(msg)
        except _ResetRequested:
            reset = True
            self._set_broken(ChannelBrokenError(f"prefill worker {self.prefill_id} asked for a new epoch"))
        except AuthenticationError as exc:
            self._side.counters.record_refused()
            self._set_broken(exc)
        except (TransferError, RuntimeError) as exc:
            self._set_broken(as_transfer_error(exc, f"KV channel from {self.prefill_id} failed"))
        finally:
            self._teardown()
        if reset:
            self._on_reset(self)

    def _next(self) -> ControlMessage | None:
        """The next message on the control queue, or None once the channel stops."""
        assert self._store is not None
        while self._state.alive:
            try:
                msg = next_control(self._store, self._side.config.idle_wait)
            except ProtocolError:
                if not self._gate.enabled:
                    raise
                self._refuse("a malformed control message")
                continue
            if msg is None:
                continue
            if self._state.alive and not self._gate.admits(msg):  # (not alive: our own wake-up)
                self._refuse(f"a {msg.kind.name} without a valid tag")
                continue
            if msg.kind is Control.RESET:
                raise _ResetRequested
            if msg.kind is Control.CLOSE:
                if self._state.alive:
                    self._set_broken(
                        ChannelClosedError(f"prefill worker {self.prefill_id} closed the channel")
                    )
                return None
            return msg
        return None

    def _rendezvous(self) -> bool:
        """Wait for JOIN, check layouts, build the group. False if closed meanwhile."""
        msg = self._next()
        if msg is None:
            return False
        if msg.kind is not Control.JOIN:
            raise ProtocolError(f"expected JOIN from {self.prefill_id}, got {msg.kind.name}")
        assert self._store is not None
        peer = f"prefill worker {self.prefill_id}"
        theirs = self._store.get(LAYOUT_KEYS[1])
        self._gate.accept(self._store, msg, self._side.layout.to_json().encode(), theirs)
        self._side.layout.check_compatible(KVLayout.from_json(theirs, peer), peer)
        group = open_pair_group(
            self._gate.group_store(dist.PrefixStore(GROUP_PREFIX, self._store)),
            DECODE_RANK,
            self._side.kv_cache.device,
            self._side.config,
        )
        with self._lock:
            self._group = group  # from here on, abort() and teardown drop it
        self._gate.prove_group(group)
        self._pool = BufferPool(group.wire_device)
        with self._lock:
            if self._state is ChannelState.CONNECTING:
                self._state = ChannelState.READY
        self._ready.set()
        return self._state is ChannelState.READY

    def _receive(self, msg: ControlMessage) -> None:
        side, group, pool, transfer_id = self._side, self._group, self._pool, msg.transfer_id
        assert group is not None and pool is not None
        start = time.perf_counter()
        try:
            frame = Frame.decode(msg.frame)
            frame.validate(side.layout, self._seq, side.kv_cache.shape[0])
            self._seq += 1
            blocks, problem = self._resolve(transfer_id, frame)
            recv_payload(group, frame.runs, side.kv_cache, pool, land=blocks is not None)
        except (TransferError, RuntimeError) as exc:
            error = as_transfer_error(exc, f"KV transfer {transfer_id} from {self.prefill_id} failed")
            side.counters.record_failure()
            side.callbacks.error(transfer_id, error)
            raise error  # noqa: B904 (as_transfer_error chained it)
        stats = TransferStats(
            transfer_id, frame.num_tokens, frame.num_blocks, frame.payload_bytes, time.perf_counter() - start
        )
        if problem is not None:
            side.counters.record_failure()
            side.callbacks.error(transfer_id, problem)
        elif blocks is None:
            side.counters.record(stats, cancelled=True)
        else:
            side.counters.record(stats)
            side.callbacks.complete(transfer_id, stats)

    def _resolve(self, transfer_id: int, frame: Frame) -> tuple[list[int] | None, Exception | None]:
        """Destination blocks, None to discard (cancelled), or why they cannot take the payload."""
        try:
            ids = self._side.callbacks.resolve(transfer_id, frame.num_tokens, frame.num_blocks)
            if ids is None:
                return None, None
            cache = self._side.kv_cache
            check_block_ids(ids, frame.num_tokens, self._side.layout.block_size, cache.shape[0])
            if not frame.lays_out(ids):
                raise ValueError(
                    f"the sender's runs {list(frame.runs)} do not lay out the reserved blocks {list(ids)}"
                )
            return list(ids), None
        except Exception as exc:
            log.warning("resolve(%d) failed, discarding its KV: %s", transfer_id, exc)
            return None, exc

    def _refuse(self, what: str) -> None:
        """Count and drop a message a peer without the token could have written."""
        self._side.counters.record_refused()
        _REFUSALS.warn(f"KV channel from {self.prefill_id} (epoch {self.epoch}) dropped {what}")

    def _set_broken(self, exc: BaseException) -> None:
        with self._lock:
            if self._state.alive:
                self._state, self._error = ChannelState.BROKEN, exc
                level = logging.INFO if isinstance(exc, ChannelClosedError) else logging.WARNING
                log.log(level, "KV channel from %s (epoch %d) ended: %s", self.prefill_id, self.epoch, exc)
        self._ready.set()

    def _teardown(self) -> None:
        """Fail what was announced but not received, drop the group and our store connection."""
        self._ready.set()
        error = self._error or ChannelClosedError(f"channel to {self.prefill_id} was closed")
        try:
            pending = drain_controls(self._store) if self._store is not None else []
        except RuntimeError:
            pending = []
        for msg in pending:
            if msg.kind is Control.SEND and self._gate.admits(msg):
                self._side.counters.record_failure()
                self._side.callbacks.error(msg.transfer_id, error)
        with self._lock:
            group, self._group, self._store, self._pool = self._group, None, None, None
        if group is not None:
            group.abort()
