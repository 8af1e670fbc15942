"""WorkerWatch: one watcher's stream, a snapshot followed by the changes after it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from scalellm.registry.bus import BusMessage
from scalellm.registry.records import EventType, WorkerEvent, WorkerRecord
from scalellm.registry.store import RegistryStore


class WorkerWatch:
    """Snapshot (with every worker's block hashes), then JOINED / LEFT / EXPIRED / LOAD / BLOCKS
    events, for one watcher.

    It subscribes before reading the snapshot, so nothing falls between the two; it keeps the
    watcher's view, so every event carries the worker's full record and events about workers
    outside the view (another model, or already gone) are dropped. Redis failures end the
    iteration with BackendUnavailable.
    """

    def __init__(self, store: RegistryStore, model: str | None = None) -> None:
        self._store = store
        self._model = model or None
        self._known: dict[str, WorkerRecord] = {}

    async def events(self) -> AsyncIterator[WorkerEvent]:
        """The snapshot event, then every change, until cancelled or Redis fails."""
        async with self._store.subscribe() as subscription:
            records = await self._store.list_workers(self._model)
            self._known = {r.worker_id: r for r in records}
            # Read after subscribing: a change made meanwhile arrives again as an event, and
            # applying set changes again, in order, leaves the same sets.
            blocks = await self._store.block_sets([r.worker_id for r in records])
            yield WorkerEvent(
                type=EventType.SNAPSHOT,
                snapshot=tuple(records),
                lease_s=self._store.lease_s,
                snapshot_blocks=blocks,
            )
            async for message in subscription:
                event = self.apply(message)
                if event is not None:
                    yield event

    def apply(self, message: BusMessage) -> WorkerEvent | None:
        """Fold one channel message into the view; the event to send, or None to send nothing."""
        if message.type is EventType.JOINED and message.record is not None:
            if self._model and message.record.info.model != self._model:
                return self._remove(message.worker_id, EventType.LEFT)  # re-registered for another model
            self._known[message.worker_id] = message.record
            return WorkerEvent(type=EventType.JOINED, worker_id=message.worker_id, worker=message.record)
        if message.type is EventType.LOAD and message.load is not None:
            known = self._known.get(message.worker_id)
            if known is None:
                return None
            record = self._known[message.worker_id] = known.with_load(message.load)
            return WorkerEvent(type=EventType.LOAD, worker_id=message.worker_id, worker=record)
        if message.type in (EventType.LEFT, EventType.EXPIRED):
            return self._remove(message.worker_id, message.type)
        if message.type is EventType.BLOCKS and message.worker_id in self._known:
            return WorkerEvent(type=EventType.BLOCKS, worker_id=message.worker_id, blocks=message.blocks)
        return None

    def _remove(self, worker_id: str, kind: EventType) -> WorkerEvent | None:
        record = self._known.pop(worker_id, None)
        if record is None:
            return None
        return WorkerEvent(type=kind, worker_id=worker_id, worker=record)
