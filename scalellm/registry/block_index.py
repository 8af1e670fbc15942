"""BlockIndex: which prefix-cache block hashes each worker holds, as the registry last said.

WorkerView folds the watch stream into it: a SNAPSHOT replaces every set, BLOCKS changes one
(a reset replaces it), JOINED empties it (a new registration starts over; its reset follows),
LEFT and EXPIRED drop it. Routing asks how long a prompt's prefix is on a worker:

    prompt hashes   h0 h1 h2 h3 h4
    worker holds    h0 h1    h3        -> matched_blocks = 2 (the chain breaks at h2)
"""

from __future__ import annotations

from collections.abc import Sequence

from scalellm.registry.records import EventType, WorkerEvent


class BlockIndex:
    """Worker id -> set of cached block hashes (signed, as scalellm.kvhash makes them)."""

    def __init__(self) -> None:
        self._sets: dict[str, set[int]] = {}

    def matched_blocks(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt's hash chain the worker holds."""
        held = self._sets.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def size(self, worker_id: str) -> int:
        """Number of hashes known for the worker."""
        return len(self._sets.get(worker_id, ()))

    def holds(self, worker_id: str, h: int) -> bool:
        """True if the worker is known to hold the block hash h."""
        return h in self._sets.get(worker_id, ())

    def apply(self, event: WorkerEvent) -> None:
        """Fold one watch event in."""
        if event.type is EventType.SNAPSHOT:
            self._sets = {b.worker_id: set(b.hashes) for b in event.snapshot_blocks}
        elif event.type is EventType.BLOCKS and event.blocks is not None:
            delta = event.blocks
            held = self._sets.setdefault(event.worker_id, set())
            if delta.reset:
                held.clear()
            held.difference_update(delta.removed)
            held.update(delta.added)
        elif event.type in (EventType.JOINED, EventType.LEFT, EventType.EXPIRED):
            self._sets.pop(event.worker_id, None)
