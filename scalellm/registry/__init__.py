"""The placement registry: typed records, the worker and gateway clients, and the Redis store.

Workers use `WorkerRegistration` (over a `RegistryClient`); the gateway uses `WorkerView`; the
kvstore service is a thin gRPC layer over `RegistryStore`, `WorkerWatch` and `LeaseReaper`.
The Redis side is imported lazily, so a gateway importing this package never loads redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalellm.registry.backoff import Backoff
from scalellm.registry.block_index import BlockIndex
from scalellm.registry.client import RegistryClient, parse_addresses
from scalellm.registry.errors import (
    BackendUnavailable,
    InvalidRegistration,
    LeaseSuperseded,
    LeaseUnknown,
    RegistryError,
    RegistryUnavailable,
)
from scalellm.registry.records import (
    EventType,
    Lease,
    WorkerBlocks,
    WorkerEvent,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerRole,
)
from scalellm.registry.view import WorkerView
from scalellm.registry.view_state import ViewSnapshot
from scalellm.registry.worker import BlockSource, LoadSource, WorkerRegistration

if TYPE_CHECKING:
    from scalellm.registry.reaper import LeaseReaper
    from scalellm.registry.store import RegistryStore
    from scalellm.registry.watch import WorkerWatch

_LAZY = {
    "RegistryStore": "scalellm.registry.store",
    "WorkerWatch": "scalellm.registry.watch",
    "LeaseReaper": "scalellm.registry.reaper",
}

__all__ = [
    "BackendUnavailable",
    "Backoff",
    "BlockIndex",
    "BlockSource",
    "EventType",
    "InvalidRegistration",
    "Lease",
    "LeaseReaper",
    "LeaseSuperseded",
    "LeaseUnknown",
    "LoadSource",
    "RegistryClient",
    "RegistryError",
    "RegistryStore",
    "RegistryUnavailable",
    "ViewSnapshot",
    "WorkerBlocks",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerRecord",
    "WorkerRegistration",
    "WorkerRole",
    "WorkerView",
    "WorkerWatch",
    "parse_addresses",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalellm.registry' has no attribute {name!r}")
