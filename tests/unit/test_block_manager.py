from __future__ import annotations

import pytest

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request
from scalellm.types import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=16)


def _compute_all(bm: BlockManager, req: Request) -> None:
    req.num_computed_tokens = req.num_tokens
    bm.commit_computed_blocks(req)


def test_allocate_and_free_account_exactly() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _req("a", list(range(10)))
    assert bm.allocate(a, a.num_tokens)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 7
    assert bm.allocate(a, 13)  # grows by one block
    assert len(a.block_ids) == 4 and bm.num_free_blocks == 6
    bm.free_request(a)
    assert bm.num_free_blocks == 10 and a.block_ids == []


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = _req("a", list(range(20)))
    assert not bm.allocate(a, a.num_tokens)
    assert a.block_ids == [] and bm.num_free_blocks == 3
    b = _req("b", list(range(8)))
    assert not bm.allocate(b, b.num_tokens, reserve=2)
    assert bm.allocate(b, b.num_tokens, reserve=1)


def test_prefix_blocks_are_shared_and_refcounted() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _req("a", list(range(12)))
    assert bm.allocate(a, a.num_tokens)
    _compute_all(bm, a)
    b = _req("b", [*range(8), 99, 98])
    assert bm.allocate(b, b.num_tokens)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.ref_counts[a.block_ids[0]] == 2
    assert bm.num_free_blocks == 10 - 3 - 1
    bm.free_request(a)
    assert bm.ref_counts[b.block_ids[0]] == 1
    bm.free_request(b)
    assert bm.num_free_blocks == 10


def test_blocks_are_shared_only_under_the_same_cache_salt() -> None:
    """vLLM's cache_salt: a prompt cached under one salt (or none) is a miss under another."""
    bm = BlockManager(num_blocks=32, block_size=4)
    prompt = list(range(12))

    def cached_tokens(rid: str, salt: str | None) -> int:
        req = Request(rid, prompt, SamplingParams(cache_salt=salt), max_tokens=16)
        assert bm.allocate(req, req.num_tokens)
        _compute_all(bm, req)
        return req.num_cached_tokens

    assert cached_tokens("plain", None) == 0
    assert cached_tokens("alice", "alice-secret") == 0  # not the unsalted blocks
    assert cached_tokens("bob", "bob-secret") == 0
    assert cached_tokens("alice-again", "alice-secret") == 8  # her own: two full blocks
    assert cached_tokens("plain-again", None) == 8


def test_full_hit_still_computes_the_last_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _req("a", list(range(8)))
    assert bm.allocate(a, 8)
    _compute_all(bm, a)
    b = _req("b", list(range(8)))
    assert bm.allocate(b, 8)
    assert b.num_computed_tokens == 4  # block 2 is recomputed: never write into a shared block
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]


def test_freed_cached_blocks_are_reusable_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5)
    _compute_all(bm, a)
    bm.free_request(a)
    assert bm.num_free_blocks == 4
    b = _req("b", [1, 2, 3, 4, 9])
    assert bm.allocate(b, 5)
    assert b.num_cached_tokens == 4  # hit after its owner finished
    bm.free_request(b)
    c = _req("c", list(range(100, 108)))  # takes every block: old hashes are forgotten
    assert bm.allocate(c, 8)
    _compute_all(bm, c)
    bm.free_request(c)
    d = _req("d", [1, 2, 3, 4, 9])
    assert bm.allocate(d, 5)
    assert d.num_cached_tokens == 0
    assert len(bm.cached) == 1  # three of c's four cached blocks were handed to d


def test_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(8)))
    assert bm.allocate(a, 8)
    _compute_all(bm, a)
    b = _req("b", list(range(8)))
    assert bm.allocate(b, 8)
    assert b.num_cached_tokens == 0 and set(a.block_ids).isdisjoint(b.block_ids)


def test_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_blocks_freed_together_come_back_as_an_ascending_run() -> None:
    """The KV transfer sends a run of consecutive ids as one slice, so allocation keeps runs whole."""
    bm = BlockManager(num_blocks=12, block_size=4)
    a, b = _req("a", list(range(16))), _req("b", list(range(100, 132)))
    assert bm.allocate(a, a.num_tokens) and bm.allocate(b, b.num_tokens)
    assert a.block_ids == [0, 1, 2, 3] and b.block_ids == list(range(4, 12))
    bm.free_request(a)  # freed tail first: 3, 2, 1, 0 on the free list
    c = _req("c", list(range(200, 216)))
    assert bm.allocate(c, c.num_tokens)
    assert c.block_ids == [0, 1, 2, 3]
