"""Prefix-block placement through the real kvstore and Redis: a worker's block manager publishes
its hash deltas with its registration, every gateway's WorkerView index follows (eviction, a
worker's death or restart, a gateway joining late)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request
from scalellm.kvhash import BlockHashDelta, prompt_block_hashes
from scalellm.registry import Backoff, RegistryClient, WorkerInfo, WorkerRegistration, WorkerRole, WorkerView
from scalellm.types import SamplingParams
from services.kvstore.server import KvstoreServer

BS = 4


def _info(worker_id: str = "decode-0") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=WorkerRole.BOTH,
        model="smol",
        grpc_address="127.0.0.1:50061",
        kv_capacity_blocks=3,
        kv_block_size=BS,
    )


class Cache:
    """A real BlockManager standing in for a worker's engine, and the block source over it."""

    def __init__(self, num_blocks: int = 3) -> None:
        self.bm = BlockManager(num_blocks=num_blocks, block_size=BS)
        self.taken = 0

    def run(self, tokens: list[int]) -> list[int]:
        """Compute a prompt (and free it, its blocks stay cached); returns its prefix hashes."""
        req = Request(f"r{self.taken}", tokens, SamplingParams(), max_tokens=4)
        self.taken += 1
        assert self.bm.allocate(req, req.num_tokens)
        req.num_computed_tokens = req.num_tokens
        self.bm.commit_computed_blocks(req)
        self.bm.free_request(req)
        return prompt_block_hashes(tokens, BS)

    async def source(self, full: bool) -> BlockHashDelta:
        return self.bm.take_hash_delta(full)


def _fast() -> Backoff:
    return Backoff(initial_s=0.05, max_s=0.2)


@pytest.fixture
async def address(kvstore: KvstoreServer) -> str:
    return f"127.0.0.1:{kvstore.port}"


@pytest.fixture
async def views(address: str) -> AsyncIterator[list[WorkerView]]:
    """Two gateways' views of the same registry."""
    made = [WorkerView(RegistryClient(address), backoff=_fast()) for _ in range(2)]
    for view in made:
        await view.start(wait=True, timeout_s=30)
    yield made
    for view in made:
        await view.stop()
        await view.client.close()


async def _until(view: WorkerView, check: object, timeout_s: float = 30.0) -> None:
    """Wait until check() holds on the view's index; the timeout is a hang guard only."""
    assert callable(check)
    await view.wait_until(lambda _s: bool(check()), timeout_s)


def _registration(address: str, cache: Cache, worker_id: str = "decode-0") -> WorkerRegistration:
    return WorkerRegistration(
        RegistryClient(address),
        _info(worker_id),
        backoff=_fast(),
        block_source=cache.source,
        blocks_interval_s=0.02,
    )


async def test_views_follow_adds_and_evictions(address: str, views: list[WorkerView]) -> None:
    cache = Cache()
    worker = _registration(address, cache)
    await worker.start(timeout_s=30)
    first = cache.run(list(range(9)))  # 2 full blocks
    for view in views:
        await _until(view, lambda v=view: v.blocks.matched_blocks("decode-0", first) == 2)
    second = cache.run(list(range(50, 59)))  # needs all 3 blocks: evicts the first prompt's
    for view in views:
        await _until(view, lambda v=view: v.blocks.matched_blocks("decode-0", second) == 2)
        assert view.blocks.matched_blocks("decode-0", first) == 0
        assert view.blocks.size("decode-0") == 2
    await worker.drain()
    for view in views:  # deregistered: its blocks leave the index with it
        await _until(view, lambda v=view: v.blocks.size("decode-0") == 0)
    await worker.client.close()


async def test_a_gateway_started_later_gets_the_full_sets(address: str, views: list[WorkerView]) -> None:
    cache = Cache(num_blocks=6)
    worker = _registration(address, cache)
    cache.run(list(range(9)))  # cached before the worker registers: sent whole with Register
    await worker.start(timeout_s=30)
    hashes = cache.run([7] * 4 + list(range(4)))
    await _until(views[0], lambda: views[0].blocks.matched_blocks("decode-0", hashes) == 1)
    late = WorkerView(RegistryClient(address), backoff=_fast())
    await late.start(wait=True, timeout_s=30)
    assert late.blocks.matched_blocks("decode-0", hashes) == 1
    assert late.blocks.matched_blocks("decode-0", prompt_block_hashes(list(range(9)), BS)) == 2
    await late.stop()
    await late.client.close()
    await worker.drain()
    await worker.client.close()


async def test_a_dead_worker_leaves_the_index_and_its_restart_starts_over(
    address: str, views: list[WorkerView]
) -> None:
    cache = Cache()
    worker = _registration(address, cache)
    await worker.start(timeout_s=30)
    old = cache.run(list(range(9)))
    view = views[0]
    await _until(view, lambda: view.blocks.matched_blocks("decode-0", old) == 2)
    await worker.stop()  # dies silently: the lease expires
    await view.wait_until(lambda s: "decode-0" not in s.ids, 30)
    assert view.blocks.size("decode-0") == 0
    restarted = Cache()  # a new process: an empty cache, then one prompt
    new = restarted.run([3] * 9)
    again = _registration(address, restarted)
    await again.start(timeout_s=30)
    await _until(view, lambda: view.blocks.matched_blocks("decode-0", new) == 2)
    assert view.blocks.matched_blocks("decode-0", old) == 0
    await again.drain()
    await asyncio.gather(worker.client.close(), again.client.close())
