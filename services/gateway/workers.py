"""Where the workers are: a WorkerSet from the live registry view or from static addresses.

Routing reads `WorkerSource.current()` once per sequence; both sources answer from memory (the
registry source rebuilds its set only when the view's version changes), so no request ever waits
on Redis or the kvstore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scalellm.registry import WorkerRecord, WorkerRole, WorkerView


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEndpoint:
    """A worker as routing sees it. free_blocks None: unknown (static workers, no report yet)."""

    worker_id: str
    address: str
    role: WorkerRole
    block_size: int = 0
    running: int = 0
    waiting: int = 0
    free_blocks: int | None = None
    reported_at: float = 0.0  # the load report's time; a new value means a fresh report

    @classmethod
    def from_record(cls, record: WorkerRecord) -> WorkerEndpoint:
        info, load = record.info, record.load
        known = load.updated_at > 0
        return cls(
            worker_id=info.worker_id,
            address=info.grpc_address,
            role=info.role,
            block_size=info.kv_block_size,
            running=load.running,
            waiting=load.waiting,
            free_blocks=load.free_blocks if known else None,
            reported_at=load.updated_at,
        )

    @classmethod
    def parse_static(cls, spec: str, role: WorkerRole) -> WorkerEndpoint:
        """``host:port`` or ``id=host:port`` (the id defaults to the address)."""
        worker_id, sep, address = spec.partition("=")
        if not sep:
            worker_id, address = spec, spec
        if not address or ":" not in address:
            raise ValueError(f"worker address {spec!r} is not [id=]host:port")
        return cls(worker_id=worker_id, address=address, role=role)


@dataclass(frozen=True, slots=True)
class WorkerSet:
    """Decode-capable workers (DECODE, BOTH) and prefill workers (PREFILL) at one moment."""

    decode: tuple[WorkerEndpoint, ...] = ()
    prefill: tuple[WorkerEndpoint, ...] = ()


class WorkerSource(Protocol):
    """Anything that can say which workers exist right now."""

    def current(self) -> WorkerSet: ...


class StaticWorkers:
    """Workers fixed by flags (--decode-addr, --prefill-addr): no kvstore, no load reports."""

    def __init__(self, decode: Sequence[str], prefill: Sequence[str] = ()) -> None:
        self._set = WorkerSet(
            decode=tuple(WorkerEndpoint.parse_static(a, WorkerRole.BOTH) for a in decode),
            prefill=tuple(WorkerEndpoint.parse_static(a, WorkerRole.PREFILL) for a in prefill),
        )

    def current(self) -> WorkerSet:
        return self._set


class RegistryWorkers:
    """Workers from the gateway's live WorkerView, optionally only those serving one model."""

    def __init__(self, view: WorkerView, model: str | None = None) -> None:
        self.view = view
        self._model = model
        self._version = -1
        self._set = WorkerSet()

    def current(self) -> WorkerSet:
        snapshot = self.view.snapshot()
        if snapshot.version != self._version:
            self._set = WorkerSet(
                decode=tuple(WorkerEndpoint.from_record(r) for r in snapshot.decode_workers(self._model)),
                prefill=tuple(
                    WorkerEndpoint.from_record(r)
                    for r in snapshot.prefill_workers(self._model)
                    if r.info.role is WorkerRole.PREFILL
                ),
            )
            self._version = snapshot.version
        return self._set
