"""Prefix-block placement through the real kvstore and Redis: a worker's block manager publishes
its hash deltas with its registration, every gateway's WorkerView index follows (eviction, a
worker's death or restart, a gateway joining late, an engine step longer than the lease)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scalellm.engine.async_engine import AsyncEngine
from scalellm.engine.block_manager import BlockManager
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import Request
from scalellm.kvhash import BlockHashDelta, prompt_block_hashes
from scalellm.registry import Backoff, RegistryClient, WorkerInfo, WorkerRegistration, WorkerRole, WorkerView
from scalellm.types import SamplingParams
from services.kvstore.server import KvstoreServer
from tests.service.conftest import TEST_LEASE_S

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


async def test_an_engine_step_longer_than_the_lease_keeps_the_lease(
    address: str, views: list[WorkerView], tiny_llama: Path
) -> None:
    """The heartbeat takes the block hashes the step thread published and never waits for the step
    under way: a step held for three leases (a long prefill on a CPU runs for seconds) leaves the
    worker registered, and the blocks that step computed reach the index once it ends. (Waiting
    for the step boundary let a decode worker's lease lapse under a burst of long prompts, and the
    gateway dropped it with requests running.)"""
    config = EngineConfig(
        model=str(tiny_llama), dtype="float32", device="cpu", num_kv_blocks=64, block_size=BS
    )
    aengine = AsyncEngine(LLMEngine(config))
    engine = aengine.engine
    aengine.start()
    worker = WorkerRegistration(
        RegistryClient(address),
        _info(),
        backoff=_fast(),
        block_source=aengine.take_block_hash_delta,
        blocks_interval_s=0.02,
    )
    in_step, release = threading.Event(), threading.Event()
    forward = engine.runner.forward

    def held(*args: object, **kwargs: object) -> object:
        in_step.set()
        release.wait(120)
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    try:
        await worker.start(timeout_s=30)
        engine.runner.forward = held  # type: ignore[method-assign]
        prompt = list(range(3, 21))
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        request = engine.make_request("r", prompt, params)
        finished = asyncio.ensure_future(_drain(aengine.add_and_stream(request)))
        assert await asyncio.to_thread(in_step.wait, 60)
        await asyncio.sleep(3 * TEST_LEASE_S)  # the step runs on, three leases long
        assert views[0].get("decode-0") is not None, "the lease lapsed while a step ran"
        release.set()
        await asyncio.wait_for(finished, 120)
        hashes = prompt_block_hashes(prompt, BS)
        await _until(views[0], lambda: views[0].blocks.matched_blocks("decode-0", hashes) == len(hashes))
        assert worker.registrations == 1
    finally:
        release.set()
        await worker.drain()
        await worker.client.close()
        aengine.stop()


async def _drain(events: AsyncIterator[object]) -> None:
    async for _ in events:
        pass
