"""PendingTransfers: which reserved blocks each expected KV transfer lands in.

The receiver thread asks ``resolve`` where a transfer goes and reports ``complete`` or ``fail``;
the event loop ``expect``s transfers and ``cancel``s them. A cancelled transfer that is already
being received keeps its blocks until the receive ends, so freed blocks are never written:

    expect ──> RESERVED ──resolve──> RECEIVING ──complete/fail──> (gone, future resolved)
                  │                      │
               cancel: gone at once   cancel: flagged; the caller waits for the end
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

from scalellm.transfer import TransferStats


class TransferAborted(Exception):
    """The transfer was cancelled by the decode worker before it landed."""


@dataclass
class _Pending:
    block_ids: list[int]
    landed: asyncio.Future[TransferStats]
    receiving: bool = False
    cancelled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class PendingTransfers:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, transfer_id: int, block_ids: list[int]) -> asyncio.Future[TransferStats]:
        entry = _Pending(list(block_ids), self._loop.create_future())
        with self._lock:
            self._pending[transfer_id] = entry
        return entry.landed

    async def cancel(self, transfer_id: int) -> None:
        """Forget a transfer; returns once nothing can be written into its blocks any more."""
        with self._lock:
            entry = self._pending.get(transfer_id)
            if entry is None:
                return
            entry.cancelled = True
            if not entry.receiving:
                del self._pending[transfer_id]
                _settle(entry.landed, TransferAborted(f"transfer {transfer_id} cancelled"))
                return
        await entry.done.wait()

    # ---- receiver thread -----------------------------------------------------------------

    def resolve(self, transfer_id: int, num_tokens: int, num_blocks: int) -> list[int] | None:
        with self._lock:
            entry = self._pending.get(transfer_id)
            if entry is None or entry.cancelled or num_blocks != len(entry.block_ids):
                return None
            entry.receiving = True
            return entry.block_ids

    def complete(self, transfer_id: int, stats: TransferStats) -> None:
        self._finish(transfer_id, stats)

    def fail(self, transfer_id: int, exc: BaseException) -> None:
        self._finish(transfer_id, exc)

    def _finish(self, transfer_id: int, outcome: TransferStats | BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(transfer_id, None)
        if entry is not None:
            self._loop.call_soon_threadsafe(_deliver, entry, outcome)


def _deliver(entry: _Pending, outcome: TransferStats | BaseException) -> None:
    _settle(entry.landed, outcome)
    entry.done.set()


def _settle(fut: asyncio.Future[TransferStats], outcome: TransferStats | BaseException) -> None:
    if fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
        with contextlib.suppress(BaseException):
            fut.exception()  # mark retrieved: a cancelled waiter may never look
    else:
        fut.set_result(outcome)
