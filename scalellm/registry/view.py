"""WorkerView: the gateway's live, local picture of the mesh, fed by WatchWorkers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from scalellm.lifecycle import cancel_and_wait
from scalellm.registry.backoff import Backoff
from scalellm.registry.block_index import BlockIndex
from scalellm.registry.client import RegistryClient
from scalellm.registry.errors import RegistryUnavailable
from scalellm.registry.records import EventType, WorkerEvent, WorkerRecord
from scalellm.registry.view_state import ViewSnapshot, ViewState

log = logging.getLogger(__name__)


class WorkerView:
    """Keeps a ViewSnapshot current from a WatchWorkers stream, for routing with no round trip.

    It reconnects with backoff (moving across kvstore replicas) and keeps the last view while
    disconnected. After a reconnect the fresh snapshot replaces the view, except that workers it
    lacks stay for one lease as `stale` (they may be re-registering after a Redis restart) unless
    an event settles them first. ``blocks`` is the per-worker index of cached prefix-block
    hashes carried by the same stream (the snapshot replaces it too).
    """

    def __init__(
        self,
        client: RegistryClient,
        *,
        model: str | None = None,
        backoff: Backoff | None = None,
        stale_grace_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self._model = model
        self._backoff = backoff or Backoff()
        self._state = ViewState(stale_grace_s=stale_grace_s, clock=clock)
        self.blocks = BlockIndex()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stale_timer: asyncio.TimerHandle | None = None
        self.reconnects = 0

    def snapshot(self) -> ViewSnapshot:
        """The current view (immutable; cheap to call per request)."""
        return self._state.snapshot()

    @property
    def connected(self) -> bool:
        """True while a watch stream is open and has delivered its snapshot."""
        return self._state.connected

    async def start(self, *, wait: bool = False, timeout_s: float | None = None) -> None:
        """Start watching; with wait, return once the first snapshot arrived."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-worker-view")
        if wait:
            await self.wait_until(lambda s: s.synced, timeout_s)

    async def stop(self) -> None:
        """Stop watching (the last view stays readable)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._set_connected(False)

    async def __aenter__(self) -> WorkerView:
        await self.start(wait=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_until(
        self, predicate: Callable[[ViewSnapshot], bool], timeout_s: float | None = None
    ) -> ViewSnapshot:
        """Wait until predicate(snapshot) holds; TimeoutError after timeout_s."""

        async def _wait() -> ViewSnapshot:
            while not predicate(snapshot := self.snapshot()):
                await self._changed.wait()
            return snapshot

        return await asyncio.wait_for(_wait(), timeout_s)

    def apply(self, event: WorkerEvent) -> None:
        """Fold one event into the view (the watch loop calls this; tests may too)."""
        self.blocks.apply(event)
        if self._state.apply(event):
            self._notify()
        if event.type is EventType.SNAPSHOT:
            self._schedule_stale_drop()
        elif event.type is EventType.BLOCKS:
            self._notify()  # the worker set is unchanged, but waiters may watch the index

    def get(self, worker_id: str) -> WorkerRecord | None:
        """One worker's record in the current view, or None."""
        return self.snapshot().get(worker_id)

    async def _run(self) -> None:
        while True:
            reason = "the stream ended"
            try:
                async for event in self.client.watch(self._model):
                    self.apply(event)
                    if event.type is EventType.SNAPSHOT:
                        self._backoff.reset()
                        log.info("registry view synced: %d worker(s)", len(event.snapshot))
            except RegistryUnavailable as exc:
                reason = str(exc)
            # Warn once per outage; the retries after that are routine.
            level = logging.WARNING if self.connected else logging.DEBUG
            log.log(level, "registry watch lost, keeping the last view and reconnecting: %s", reason)
            self._set_connected(False)
            self.reconnects += 1
            await asyncio.sleep(self._backoff.next_delay())

    def _set_connected(self, connected: bool) -> None:
        if self._state.set_connected(connected):
            self._notify()

    def _schedule_stale_drop(self) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        delay = self._state.next_stale_deadline_in()
        if delay is not None:
            self._stale_timer = asyncio.get_running_loop().call_later(delay, self._drop_stale)

    def _drop_stale(self) -> None:
        self._stale_timer = None
        if self._state.drop_stale():
            self._notify()
        self._schedule_stale_drop()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
