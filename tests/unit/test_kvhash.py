"""The shared block-hash chain and the block manager's hash deltas (what workers publish)."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request
from scalellm.kvhash import (
    NO_PARENT,
    BlockHashDelta,
    BlockHashLog,
    BlockHashMirror,
    from_wire,
    hash_block,
    prompt_block_hashes,
    to_wire,
)
from scalellm.types import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=16)


def _run(bm: BlockManager, req: Request) -> None:
    assert bm.allocate(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.commit_computed_blocks(req)


def test_gateway_chain_is_the_engines_and_skips_the_last_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 113))  # 13 tokens: 3 full blocks, all cacheable after computing
    _run(bm, _req("a", tokens))
    assert set(bm.cached) == set(prompt_block_hashes([*tokens, 0], 4))
    salted = BlockManager(num_blocks=8, block_size=4)  # a cache salt: the same chain on both sides
    _run(salted, Request("s", tokens, SamplingParams(cache_salt="k"), max_tokens=16))
    assert set(salted.cached) == set(prompt_block_hashes([*tokens, 0], 4, cache_salt="k"))
    assert not set(salted.cached) & set(bm.cached)
    # A prompt never hits the block holding its last token, so the gateway does not count it.
    assert len(prompt_block_hashes(list(range(12)), 4)) == 2
    assert len(prompt_block_hashes(list(range(13)), 4)) == 3
    assert prompt_block_hashes([1, 2, 3], 0) == []


def test_hashes_agree_across_processes_with_different_hash_seeds() -> None:
    code = "from scalellm.kvhash import prompt_block_hashes as p; print(p(list(range(40)), 16))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{prompt_block_hashes(list(range(40)), 16)}\n"}


def test_the_chain_is_blake2b_of_the_parent_and_the_tokens() -> None:
    """Pinned: a cryptographic hash of a documented byte layout, not Python's tuple hash (whose
    collisions a client could compute to share another tenant's KV); the same bytes anywhere."""
    layout = struct.pack("<q4I", NO_PARENT, 1, 2, 3, 4)
    want = int.from_bytes(hashlib.blake2b(layout, digest_size=8).digest(), "little", signed=True)
    assert hash_block(NO_PARENT, [1, 2, 3, 4]) == hash_block(NO_PARENT, (1, 2, 3, 4)) == want
    assert hash_block(NO_PARENT, [1, 2, 3, 4]) != hash((NO_PARENT, (1, 2, 3, 4)))
    assert prompt_block_hashes([1, 2, 3, 4, 5], 4) == [want]
    assert hash_block(want, [1, 2, 3, 4]) != want  # the parent is part of what is hashed


def test_wire_form_is_unsigned_and_round_trips() -> None:
    for h in (-(2**63), -2, 0, 5, 2**63 - 1):
        assert 0 <= to_wire(h) < 2**64 and from_wire(to_wire(h)) == h


def test_deltas_merge_in_order() -> None:
    first = BlockHashDelta(added=(1, 2), removed=(3,))
    later = BlockHashDelta(added=(3,), removed=(2, 4))
    merged = first.then(later)
    assert sorted(merged.added) == [1, 3] and sorted(merged.removed) == [2, 4] and not merged.reset
    reset = BlockHashDelta(added=(7, 8), reset=True).then(later)
    assert sorted(reset.added) == [3, 7, 8] and reset.removed == () and reset.reset
    assert first.then(BlockHashDelta(added=(9,), reset=True)) == BlockHashDelta(added=(9,), reset=True)
    assert BlockHashDelta().empty and not BlockHashDelta(reset=True).empty


def test_block_manager_reports_adds_and_evictions_once() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = _req("a", list(range(9)))  # 2 full blocks + 1 partial
    _run(bm, a)
    delta = bm.take_hash_delta()
    assert set(delta.added) == set(prompt_block_hashes(list(range(9)), 4)) and delta.removed == ()
    assert bm.take_hash_delta().empty  # taken once
    bm.free_request(a)
    assert bm.take_hash_delta().empty  # freed but still cached: nothing changes
    b = _req("b", list(range(50, 59)))  # needs all 3 blocks: both cached ones are evicted
    _run(bm, b)
    delta = bm.take_hash_delta()
    assert set(delta.removed) == set(prompt_block_hashes(list(range(9)), 4))
    assert set(delta.added) == set(prompt_block_hashes(list(range(50, 59)), 4))
    full = bm.take_hash_delta(full=True)
    assert full.reset and set(full.added) == set(bm.cached)


def test_deltas_applied_in_turn_rebuild_the_cache_through_churn() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    published: set[int] = set()
    for i in range(12):
        req = _req(str(i), [i % 4] * 4 + list(range(i * 10, i * 10 + 5)))  # shared heads, new tails
        _run(bm, req)
        bm.free_request(req)
        if i % 3 == 2:  # several changes (an add and its eviction among them) per delta
            delta = bm.take_hash_delta()
            assert not set(delta.added) & set(delta.removed)
            published = (published - set(delta.removed)) | set(delta.added)
            assert published == set(bm.cached)


def test_a_mirror_fed_every_change_answers_changes_and_the_whole_set() -> None:
    """What the step thread publishes after each step is what the heartbeat takes: the changes since
    its last take, or the whole set as a reset (the changes so far then count as sent)."""
    bm = BlockManager(num_blocks=3, block_size=4)
    mirror = BlockHashMirror()
    published: set[int] = set()
    for i in range(12):
        req = _req(str(i), [i % 4] * 4 + list(range(i * 10, i * 10 + 5)))
        _run(bm, req)
        bm.free_request(req)
        mirror.publish(bm.take_hash_delta())  # every step
        if i == 4:
            full = mirror.take(full=True)
            assert full.reset and set(full.added) == set(bm.cached)
            assert mirror.take().empty
            published = set(full.added)
        elif i % 3 == 2:
            delta = mirror.take()
            published = (published - set(delta.removed)) | set(delta.added)
            assert published == set(bm.cached)
    mirror.publish(BlockHashDelta(added=(1, 2), reset=True))  # the block manager forgot its changes
    assert mirror.take() == BlockHashDelta(added=(1, 2), reset=True)


def test_untaken_changes_are_bounded_and_become_a_reset() -> None:
    """Nobody may take the changes (no registry, the offline LLM): past the bound they are
    forgotten, and the next take is the whole set as a reset."""
    log = BlockHashLog(max_changes=4)
    for h in range(3):
        log.added(h)
    assert log.take({0, 1, 2}) == BlockHashDelta(added=(0, 1, 2))
    for h in range(10, 20):  # churn: more changes than the bound
        log.added(h)
        log.removed(h - 1)
    assert len(log) <= 4  # bounded
    full = log.take({18, 19})
    assert full.reset and set(full.added) == {18, 19}
    log.removed(19)
    assert log.take({18}) == BlockHashDelta(removed=(19,))  # back to changes after the reset
