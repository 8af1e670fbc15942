"""Typed records of the registry: what a worker is, how loaded it is, and membership events.

These are the plain values that routing code and tests use; the protobuf messages only live at
the wire (see convert.py). All are frozen, so a snapshot handed to a router can never change
under it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from scalellm.kvhash import BlockHashDelta


class WorkerRole(enum.Enum):
    """What a worker does; values are the wire enum's numbers."""

    PREFILL = 1
    DECODE = 2
    BOTH = 3

    @property
    def can_prefill(self) -> bool:
        """True for workers that run prompts (PREFILL or BOTH)."""
        return self in (WorkerRole.PREFILL, WorkerRole.BOTH)

    @property
    def can_decode(self) -> bool:
        """True for workers that decode (DECODE or BOTH)."""
        return self in (WorkerRole.DECODE, WorkerRole.BOTH)

    @classmethod
    def parse(cls, text: str) -> WorkerRole:
        """'prefill' / 'decode' / 'both' (any case) to a role; ValueError otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown worker role {text!r} (expected prefill, decode or both)") from None


class EventType(enum.Enum):
    """Kinds of membership event; values are the wire enum's numbers."""

    SNAPSHOT = 1
    JOINED = 2
    LEFT = 3
    EXPIRED = 4
    LOAD = 5
    BLOCKS = 6


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """The static description of a worker, fixed for one registration."""

    worker_id: str
    role: WorkerRole
    model: str
    grpc_address: str
    kv_capacity_blocks: int
    kv_block_size: int
    transfer_endpoint: str = ""
    version: str = ""
    max_running: int = 0
    """Most sequences in its running batch (max_num_seqs); 0: not reported."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLoad:
    """A worker's load; updated_at is the kvstore's receive time (unix seconds, 0 if never)."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    tokens_per_second: float = 0.0
    prefill_backlog_tokens: int = 0
    """Prompt tokens waiting or partly computed here, not yet run."""
    ttft_s: float = 0.0
    """Mean time to first token over the last window (0: no first token in it)."""
    itl_s: float = 0.0
    """Mean time between two tokens of a request over the last window (0: none)."""
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRecord:
    """One live registration: description, last load and registration time (unix seconds)."""

    info: WorkerInfo
    load: WorkerLoad = field(default_factory=WorkerLoad)
    registered_at: float = 0.0

    @property
    def worker_id(self) -> str:
        """The worker's id."""
        return self.info.worker_id

    def with_load(self, load: WorkerLoad) -> WorkerRecord:
        """A copy carrying a newer load."""
        return replace(self, load=load)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """A granted lease: present lease_id on heartbeats; beat every heartbeat_interval_s."""

    worker_id: str
    lease_id: str
    lease_s: float
    heartbeat_interval_s: float


@dataclass(frozen=True, slots=True)
class WorkerBlocks:
    """One worker's whole set of cached prefix-block hashes (signed, as scalellm.kvhash makes them)."""

    worker_id: str
    hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEvent:
    """One membership event.

    SNAPSHOT carries every live worker in `snapshot`, their cached block hashes in
    `snapshot_blocks` and the lease length in `lease_s`; BLOCKS carries the change to one
    worker's block hashes in `blocks`; the other kinds carry the worker concerned in `worker`
    (its last known record for LEFT and EXPIRED).
    """

    type: EventType
    worker_id: str = ""
    worker: WorkerRecord | None = None
    snapshot: tuple[WorkerRecord, ...] = ()
    lease_s: float = 0.0
    blocks: BlockHashDelta | None = None
    snapshot_blocks: tuple[WorkerBlocks, ...] = ()
