"""The data side of WorkerView: immutable snapshots and the state machine that folds events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from scalellm.registry.records import EventType, WorkerEvent, WorkerRecord


@dataclass(frozen=True, slots=True)
class ViewSnapshot:
    """The mesh as the view last knew it: workers sorted by id, never mutated after creation.

    connected: a watch stream is open; synced: a snapshot was received at least once;
    stale_ids: workers kept from before a reconnect that the registry has not confirmed yet.
    """

    workers: tuple[WorkerRecord, ...] = ()
    version: int = 0
    connected: bool = False
    synced: bool = False
    stale_ids: frozenset[str] = frozenset()

    def get(self, worker_id: str) -> WorkerRecord | None:
        """The record of worker_id, or None."""
        return next((w for w in self.workers if w.worker_id == worker_id), None)

    @property
    def ids(self) -> tuple[str, ...]:
        """Worker ids, sorted."""
        return tuple(w.worker_id for w in self.workers)

    def prefill_workers(self, model: str | None = None) -> tuple[WorkerRecord, ...]:
        """Workers that can run prompts (PREFILL or BOTH), optionally for one model."""
        return tuple(
            w for w in self.workers if w.info.role.can_prefill and (not model or w.info.model == model)
        )

    def decode_workers(self, model: str | None = None) -> tuple[WorkerRecord, ...]:
        """Workers that can decode (DECODE or BOTH), optionally for one model."""
        return tuple(
            w for w in self.workers if w.info.role.can_decode and (not model or w.info.model == model)
        )

    def __len__(self) -> int:
        return len(self.workers)


class ViewState:
    """Workers by id plus connection flags; every method says whether the view changed."""

    def __init__(
        self, stale_grace_s: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._grace_override = stale_grace_s
        self._clock = clock
        self._workers: dict[str, WorkerRecord] = {}
        self._stale: dict[str, float] = {}  # worker_id -> when to drop it (clock time)
        self._version = 0
        self._synced = False
        self.connected = False
        self._cached: ViewSnapshot | None = ViewSnapshot()

    def snapshot(self) -> ViewSnapshot:
        """The current view; built once per change."""
        if self._cached is None:
            self._cached = ViewSnapshot(
                workers=tuple(self._workers[i] for i in sorted(self._workers)),
                version=self._version,
                connected=self.connected,
                synced=self._synced,
                stale_ids=frozenset(self._stale),
            )
        return self._cached

    def apply(self, event: WorkerEvent) -> bool:
        """Fold one event in; True if the view changed."""
        if event.type is EventType.SNAPSHOT:
            self._resync(event)
        elif event.type in (EventType.JOINED, EventType.LOAD) and event.worker is not None:
            self._workers[event.worker_id] = event.worker
            self._stale.pop(event.worker_id, None)
        elif event.type in (EventType.LEFT, EventType.EXPIRED):
            self._stale.pop(event.worker_id, None)
            if self._workers.pop(event.worker_id, None) is None:
                return False
        else:
            return False
        return self._bump()

    def _resync(self, event: WorkerEvent) -> None:
        """Replace the view by the snapshot, keeping unconfirmed workers as stale for one grace."""
        confirmed = {r.worker_id: r for r in event.snapshot}
        grace = self._grace_override if self._grace_override is not None else event.lease_s
        now = self._clock()
        stale = {
            worker_id: self._stale.get(worker_id, now + grace)
            for worker_id in self._workers.keys() - confirmed.keys()
            if grace > 0
        }
        self._workers = confirmed | {i: self._workers[i] for i in stale}
        self._stale = stale
        self._synced = True
        self.connected = True

    def set_connected(self, connected: bool) -> bool:
        """Record the stream state; True if it changed."""
        if connected == self.connected:
            return False
        self.connected = connected
        return self._bump()

    def next_stale_deadline_in(self) -> float | None:
        """Seconds until the next stale worker is due to be dropped; None if none (or disconnected)."""
        if not self._stale or not self.connected:
            return None
        return max(0.0, min(self._stale.values()) - self._clock())

    def drop_stale(self) -> bool:
        """Drop stale workers whose grace ran out (only while connected); True if any went."""
        if not self.connected:
            return False
        now = self._clock()
        due = [i for i, t in self._stale.items() if t <= now]
        for worker_id in due:
            del self._stale[worker_id]
            self._workers.pop(worker_id, None)
        return bool(due) and self._bump()

    def _bump(self) -> bool:
        self._version += 1
        self._cached = None
        return True
