"""The prefix-block hash chain, shared by the engine (which caches blocks under it) and the gateway
(which asks which worker holds a prompt's blocks). Torch-free and proto-free.

    tokens   [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes   h0 = H(-1, t0..t15)  h1 = H(h0, t16..t31)   (a partial block has no hash)

H is BLAKE2b (8-byte digest) over the parent hash and the block's token ids, little-endian: the
same in every process, Python version and machine. Not Python's ``hash((parent, tokens))``: a
block's KV is shared on a hash match alone, and the tuple hash of ints is unseeded and invertible
step by step, so a client could compute a block that collides with another tenant's known prefix
(a system prompt) and poison or read the cache under it (vLLM's CVE-2025-25183 was this). A
second preimage of a 64-bit BLAKE2b costs ~2^64 hashes; hashing costs ~1.5 us a block against
0.2 us (bench-free: ``python -m timeit``), once per block computed or matched. Hashes are signed
64-bit ints in Python; the wire carries them as fixed64 (``to_wire`` / ``from_wire`` at the proto
boundary). A request's ``cache_salt`` changes the chain's root (``chain_root``): blocks are shared
only between requests with the same salt, or with none. The chain is not salted by
model: an index is kept per worker and a worker serves one model, so two models never meet in one
lookup.

A worker reports what its block manager caches as BlockHashDelta values: hashes added and removed
since the last report, or, with ``reset``, its whole set (after it registers, so an index never
keeps what a previous life of the worker held).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NO_PARENT = -1
_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    """Chained block hash of one full block of token ids under its parent's hash."""
    data = struct.pack(f"<q{len(tokens)}I", parent, *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def chain_root(cache_salt: str | None) -> int:
    """The parent of a prompt's first block: NO_PARENT, or under a cache salt (vLLM's
    ``cache_salt``) a hash of it, so that only requests with the same salt share blocks."""
    if cache_salt is None:
        return NO_PARENT
    digest = hashlib.blake2b(cache_salt.encode(), digest_size=8, person=b"cache_salt").digest()
    return int.from_bytes(digest, "little", signed=True)


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
) -> list[int]:
    """The chain of a prompt's blocks that a prefix-cache hit can cover: full blocks only, and
    never the block holding the last token (the engine always computes that one afresh)."""
    if block_size <= 0:
        return []
    hashes: list[int] = []
    parent = chain_root(cache_salt)
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def to_wire(h: int) -> int:
    """A signed Python hash as an unsigned fixed64."""
    return h % _U64


def from_wire(u: int) -> int:
    """An unsigned fixed64 back to the signed Python hash."""
    return u - _U64 if u > _I64_MAX else u


@dataclass(frozen=True, slots=True)
class BlockHashDelta:
    """Changes to the set of block hashes a worker caches (signed Python hashes).

    A hash is in at most one of ``added`` / ``removed``; with ``reset`` the set is replaced by
    ``added`` (and ``removed`` is empty).
    """

    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    reset: bool = False

    @property
    def empty(self) -> bool:
        """Nothing to report (a reset is never empty: it clears the set)."""
        return not (self.added or self.removed or self.reset)

    def then(self, later: BlockHashDelta) -> BlockHashDelta:
        """This delta followed by a later one, as one delta."""
        if later.reset:
            return later
        added, removed = set(self.added), set(self.removed)
        added.difference_update(later.removed)
        removed.difference_update(later.added)
        added.update(later.added)
        if not self.reset:
            removed.update(later.removed)
        return BlockHashDelta(tuple(added), tuple(removed), self.reset)


class BlockHashLog:
    """Accumulates a block manager's adds and evictions until they are taken as one delta.

    Nobody may take them (a worker without a registry, the offline LLM): past ``max_changes``
    untaken changes the log forgets them and the next take is a reset to the whole set, so its
    memory stays bounded however long the cache churns.
    """

    __slots__ = ("_added", "_max_changes", "_overflowed", "_removed")

    def __init__(self, max_changes: int = 1 << 16) -> None:
        self._added: set[int] = set()
        self._removed: set[int] = set()
        self._max_changes = max_changes
        self._overflowed = False

    def added(self, h: int) -> None:
        if not self._overflowed:
            self._removed.discard(h)
            self._added.add(h)
            self._bound()

    def removed(self, h: int) -> None:
        if not self._overflowed:
            self._added.discard(h)
            self._removed.add(h)
            self._bound()

    def reset(self) -> None:
        """Forget the changes: the next take is a reset."""
        self._added.clear()
        self._removed.clear()
        self._overflowed = True

    def __len__(self) -> int:
        """Changes held (untaken)."""
        return len(self._added) + len(self._removed)

    def _bound(self) -> None:
        if len(self) > self._max_changes:
            self.reset()

    def take(self, current: Iterable[int], full: bool = False) -> BlockHashDelta:
        """The changes since the last take (and forget them); with ``full``, or when they were
        forgotten, a reset to ``current`` (the whole set now, read only then)."""
        if full or self._overflowed:
            delta = BlockHashDelta(tuple(current), (), reset=True)
        else:
            delta = BlockHashDelta(tuple(self._added), tuple(self._removed))
        self._added.clear()
        self._removed.clear()
        self._overflowed = False
        return delta


class BlockHashMirror:
    """A block manager's hash set as last published, readable from any thread.

    The engine's step thread publishes each step's changes; the registry heartbeat takes them (or
    the whole set) at once, without waiting for the step under way to end: a step can run for
    seconds (a long prefill on a CPU), and a heartbeat that waited for it let the lease expire.
    """

    __slots__ = ("_hashes", "_lock", "_log")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: set[int] = set()
        self._log = BlockHashLog()

    def publish(self, delta: BlockHashDelta) -> None:
        """Apply what the block manager's take_hash_delta gave."""
        if delta.empty:
            return
        with self._lock:
            if delta.reset:
                self._hashes = set(delta.added)
                self._log.reset()
                return
            for h in delta.removed:
                self._hashes.discard(h)
                self._log.removed(h)
            for h in delta.added:
                self._hashes.add(h)
                self._log.added(h)

    def take(self, full: bool = False) -> BlockHashDelta:
        """The changes published since the last take; with ``full``, the whole set as a reset."""
        with self._lock:
            return self._log.take(self._hashes, full)
