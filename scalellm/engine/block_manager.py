"""Paged KV-cache block accounting with reference counts and hash-based prefix reuse.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A request owns an ordered list
of block ids (its block table); token ``i`` lives in slot ``block_ids[i // bs] * bs + i % bs``.

Prefix reuse: every *full* block whose KV has been computed is registered under a hash chained
over all tokens before it, so two requests that share a prefix share its blocks:

    tokens   [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes   h0 = H(-1, t0..t15)  h1 = H(h0, t16..t31)   (partial block: no hash)

A block whose reference count falls to zero goes back on the free list but keeps its hash, so a
later request can still hit it; it is only forgotten when the free list hands it out again (least
recently freed first). The fresh blocks of one allocation are handed out in ascending order, so a
prompt that takes back what an earlier request freed gets consecutive ids (one contiguous span of
the block-major cache). Free-block accounting is exact: ``num_free_blocks`` counts every block with
no owner, cached or not.

Every hash that enters or leaves the cache is noted in a BlockHashLog; ``take_hash_delta`` hands
the changes since the last call to whoever publishes them (the worker's registry heartbeat), so a
gateway can route a prompt to the worker that already holds its prefix. The chain itself lives
in ``scalellm.kvhash`` (torch-free), where the gateway computes it too.
"""

from __future__ import annotations

from collections import OrderedDict

from scalellm.engine.request import Request
from scalellm.kvhash import BlockHashDelta, BlockHashLog, chain_root, hash_block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}
        """hash -> block id, for computed full blocks."""
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_log = BlockHashLog()

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take_hash_delta(self, full: bool = False) -> BlockHashDelta:
        """The cached hashes added and evicted since the last call; with ``full``, every cached
        hash as a reset (and the changes so far are forgotten)."""
        return self._hash_log.take(self.cached, full)

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, req: Request, num_tokens: int, reserve: int = 0) -> bool:
        """Grow ``req.block_ids`` to hold ``num_tokens`` slots; all or nothing.

        On a request's first allocation its prompt is matched against the prefix cache: hit
        blocks are shared and ``req.num_computed_tokens`` jumps past them. At least the last
        block is always computed afresh, so a sequence never writes into a shared block.
        ``reserve`` blocks must stay free afterwards (the admission watermark).
        """
        hits: list[int] = []
        # A request that wants its prompt's logprobs computes every position (no cache hits).
        cacheable = self.enable_prefix_caching and req.sampling_params.prompt_logprobs is None
        if not req.block_ids and req.num_computed_tokens == 0 and cacheable:
            hits = self._match_prefix(req, max_blocks=(req.num_tokens - 1) // self.block_size)
        num_new = self.blocks_needed(num_tokens) - len(req.block_ids) - len(hits)
        # Hit blocks that sit on the free list are taken from it too.
        num_taken = num_new + sum(1 for b in hits if self.ref_counts[b] == 0)
        if num_taken + reserve > len(self.free):
            return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        req.block_ids.extend(hits)
        if hits:
            req.num_computed_tokens = req.num_cached_tokens = len(hits) * self.block_size
        # Sorted: blocks freed together come back as an ascending run, which the KV transfer
        # sends as one contiguous slice of the block-major cache.
        req.block_ids.extend(sorted(self._pop_free() for _ in range(max(num_new, 0))))
        return True

    def free_request(self, req: Request) -> None:
        """Drop the request's references. Tail blocks go back first, so they are reused before
        the (more widely shared) head of the prefix."""
        for b in reversed(req.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
        req.block_ids = []

    def commit_computed_blocks(self, req: Request) -> None:
        """Register the hashes of the request's full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        hashes = req.block_hashes
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else chain_root(req.sampling_params.cache_salt)
            h = hash_block(parent, req.token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = req.block_ids[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
                self._hash_log.added(h)

    # ---- internals -----------------------------------------------------------------------

    def _match_prefix(self, req: Request, max_blocks: int) -> list[int]:
        hits: list[int] = []
        hashes: list[int] = []
        parent = chain_root(req.sampling_params.cache_salt)
        bs = self.block_size
        for i in range(max_blocks):
            h = hash_block(parent, req.token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
            hashes.append(h)
            parent = h
        req.block_hashes = hashes
        return hits

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
            self._hash_log.removed(h)
        self.ref_counts[block] = 1
        return block
