"""WorkerRegistration's block-hash publishing against a scripted registry client (one class under
test): the whole set with Register, changes with Heartbeat, a failed beat's changes kept."""

from __future__ import annotations

import asyncio

from scalellm.kvhash import BlockHashDelta
from scalellm.registry import (
    Backoff,
    Lease,
    RegistryUnavailable,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistration,
    WorkerRole,
)

INFO = WorkerInfo(
    worker_id="w",
    role=WorkerRole.BOTH,
    model="m",
    grpc_address="127.0.0.1:1",
    kv_capacity_blocks=8,
    kv_block_size=4,
)


class ScriptedClient:
    """Register succeeds; the first heartbeat fails as if the registry were away."""

    def __init__(self) -> None:
        self.registered: list[tuple[int, ...]] = []
        self.beats: list[BlockHashDelta | None] = []
        self.failures = 1
        self.beat = asyncio.Event()

    async def register(self, info: WorkerInfo, load: WorkerLoad, blocks: tuple[int, ...]) -> Lease:
        self.registered.append(blocks)
        return Lease(worker_id="w", lease_id="l", lease_s=60.0, heartbeat_interval_s=30.0)

    async def heartbeat(self, lease: Lease, load: WorkerLoad, blocks: BlockHashDelta | None) -> Lease:
        if self.failures:
            self.failures -= 1
            raise RegistryUnavailable("away")
        self.beats.append(blocks)
        self.beat.set()
        return lease


async def test_changes_are_sent_early_and_kept_across_a_failed_beat() -> None:
    client = ScriptedClient()
    deltas = [
        BlockHashDelta(added=(1, 2), reset=True),
        BlockHashDelta(added=(3,)),
        BlockHashDelta(removed=(1,)),
    ]
    taken: list[bool] = []

    async def source(full: bool) -> BlockHashDelta:
        taken.append(full)
        return deltas.pop(0) if deltas else BlockHashDelta()

    registration = WorkerRegistration(
        client,  # type: ignore[arg-type]
        INFO,
        backoff=Backoff(initial_s=0.01, max_s=0.01),
        block_source=source,
        blocks_interval_s=0.01,
    )
    await registration.start(timeout_s=30)
    await asyncio.wait_for(client.beat.wait(), 30)  # long before the 30 s heartbeat interval
    await registration.stop()
    assert client.registered == [(1, 2)] and taken[0] is True
    # The first beat (with 3 added) failed; the next carried it, merged with the later removal.
    (sent,) = client.beats
    assert sent is not None and sent.added == (3,) and sent.removed == (1,) and not sent.reset
