"""The gateway's bound on requests in flight, with a fair queue in front of it.

    arrive ──▶ slot free and nobody waiting? ──yes──▶ run
                     │ no
                     ▼
               queue full (max_queued)? ──yes──▶ 429
                     │ no
                     ▼
               wait in the tenant's line ──▶ a request ends: its slot goes to the next waiter,
                                             the tenant chosen by FairShares (weights), FIFO within
                                             a tenant (the body, and so its priority, is read
                                             only once the request runs)

A waiter that is cancelled leaves its line; one cancelled just as a slot was handed to it
passes the slot on.
"""

from __future__ import annotations

import asyncio
from collections import deque

from scalellm.types import FairShares, TenantShare


class AdmissionQueue:
    """At most `limit` requests run; up to `max_queued` more wait, served fairly by tenant."""

    def __init__(self, limit: int, max_queued: int = 0) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.running = 0
        self.queued = 0
        self._lines: dict[str, deque[tuple[TenantShare, asyncio.Future[None]]]] = {}
        self._shares = FairShares()

    def try_enter(self, share: TenantShare) -> bool:
        """Take a slot now if one is free and nobody waits for it."""
        if self.running < self.limit and not self.queued:
            self.running += 1
            self._shares.charge(share)
            return True
        return False

    def can_wait(self) -> bool:
        return self.queued < self.max_queued

    async def wait(self, share: TenantShare) -> None:
        """Wait in the tenant's line until a slot is handed over (call only when can_wait())."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (share, future)
        self._lines.setdefault(share.name, deque()).append(entry)
        self.queued += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave()  # the slot was ours already: pass it on
            else:
                self._drop(share.name, entry)
            raise

    def _drop(self, tenant: str, entry: tuple[TenantShare, asyncio.Future[None]]) -> None:
        line = self._lines.get(tenant)
        if line is not None and entry in line:
            line.remove(entry)
            self.queued -= 1
            if not line:
                del self._lines[tenant]

    def leave(self) -> None:
        """A running request ended: its slot goes to the next waiter, if any."""
        while True:
            tenant = self._shares.pick(self._lines)
            if tenant is None:
                self.running -= 1
                return
            entry = self._lines[tenant][0]
            self._drop(tenant, entry)
            share, future = entry
            if not future.done():  # else cancelled, its task not yet resumed: skip it
                self._shares.charge(share)
                future.set_result(None)
                return
