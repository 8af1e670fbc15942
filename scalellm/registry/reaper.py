"""LeaseReaper: turns lapsed leases into EXPIRED events and tracks whether Redis answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from scalellm.registry.errors import BackendUnavailable
from scalellm.registry.store import RegistryStore

log = logging.getLogger(__name__)

BackendStateCallback = Callable[[bool], Awaitable[None]]
ExpiredCallback = Callable[[list[str]], None]


class LeaseReaper:
    """Every interval_s, expire lapsed leases (exactly once across kvstore replicas).

    Chosen over keyspace notifications: it needs no CONFIG SET (often refused by managed Redis),
    announces each expiry exactly once however many replicas run, and catches up after an outage
    instead of losing notifications that fired while nobody listened.
    """

    def __init__(
        self,
        store: RegistryStore,
        interval_s: float = 0.25,
        on_backend_state: BackendStateCallback | None = None,
        on_expired: ExpiredCallback | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._on_backend_state = on_backend_state
        self._on_expired = on_expired
        self.backend_up: bool | None = None

    async def tick(self) -> list[str]:
        """One pass: expire what lapsed, report backend state changes; returns the expired ids."""
        try:
            expired = await self._store.reap_expired()
        except BackendUnavailable as exc:
            await self._set_backend_state(False, str(exc))
            return []
        await self._set_backend_state(True, "")
        if expired and self._on_expired is not None:
            self._on_expired(expired)
        return expired

    async def run(self) -> None:
        """Tick forever (until cancelled)."""
        while True:
            await self.tick()
            await asyncio.sleep(self._interval_s)

    async def _set_backend_state(self, up: bool, detail: str) -> None:
        if up == self.backend_up:
            return
        self.backend_up = up
        if up:
            log.info("registry backend reachable")
        else:
            log.warning("%s", detail)
        if self._on_backend_state is not None:
            await self._on_backend_state(up)
