"""Shared vocabulary of both channel ends: state, callbacks, and safe callback invocation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from scalellm.transfer.stats import TransferStats

log = logging.getLogger(__name__)

Resolver = Callable[[int, int, int], list[int] | None]
"""``resolve(transfer_id, num_tokens, num_blocks)``: the destination block ids (the ones the
prefill worker was told, in the same order), or None if cancelled."""
CompleteCallback = Callable[[int, TransferStats], None]
ErrorCallback = Callable[[int, BaseException], None]


class ChannelState(Enum):
    CONNECTING = "connecting"  # waiting for the peer to join, or building the process group
    READY = "ready"
    BROKEN = "broken"  # failed; the manager opens a new epoch on next use
    CLOSED = "closed"  # closed locally

    @property
    def alive(self) -> bool:
        return self in (ChannelState.CONNECTING, ChannelState.READY)


@dataclass(frozen=True)
class ReceiverCallbacks:
    """What the decode worker plugs into the receiver. Called on the receiver thread: keep them
    short and thread-safe (e.g. hand off with ``loop.call_soon_threadsafe``)."""

    resolve: Resolver
    on_complete: CompleteCallback
    on_error: ErrorCallback

    def complete(self, transfer_id: int, stats: TransferStats) -> None:
        try:
            self.on_complete(transfer_id, stats)
        except Exception:
            log.exception("on_complete(%d) raised", transfer_id)

    def error(self, transfer_id: int, exc: BaseException) -> None:
        try:
            self.on_error(transfer_id, exc)
        except Exception:
            log.exception("on_error(%d) raised", transfer_id)


class LogThrottle:
    """At most one warning per ``every_s`` seconds (with how many were held back): what a peer
    without the token sends must not flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self._log, self._every_s = logger, every_s
        self._lock = threading.Lock()
        self._last, self._held = float("-inf"), 0

    def warn(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._every_s:
                self._held += 1
                return
            held, self._last, self._held = self._held, now, 0
        self._log.warning("%s%s", message, f" (and {held} more since the last report)" if held else "")
