"""The registry's Redis key schema; the schema version is part of every name.

<ns>:v1:worker:<worker_id>   hash {lease, info, load, registered_ms} under a PEXPIREAT lease
<ns>:v1:workers              sorted set worker_id -> lease deadline (unix ms, Redis clock)
<ns>:v1:blocks:<worker_id>   set of the worker's cached prefix-block hashes (decimal fixed64),
                             under the same lease deadline as its hash
<ns>:v1:events               pub/sub channel of membership changes (see bus.py)
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = "v1"


@dataclass(frozen=True, slots=True)
class RegistryKeys:
    """Key names under one namespace (default `scalellm`), so several meshes can share a Redis."""

    namespace: str = "scalellm"

    @property
    def prefix(self) -> str:
        """`<ns>:v1`: what every key of this schema starts with."""
        return f"{self.namespace}:{SCHEMA_VERSION}"

    @property
    def worker_prefix(self) -> str:
        """Prefix of the per-worker hashes."""
        return f"{self.prefix}:worker:"

    def worker(self, worker_id: str) -> str:
        """The hash holding one worker's registration."""
        return self.worker_prefix + worker_id

    @property
    def blocks_prefix(self) -> str:
        """Prefix of the per-worker block-hash sets."""
        return f"{self.prefix}:blocks:"

    def blocks(self, worker_id: str) -> str:
        """The set of block hashes one worker holds."""
        return self.blocks_prefix + worker_id

    @property
    def index(self) -> str:
        """Sorted set of registered workers scored by lease deadline (listing and reaping)."""
        return f"{self.prefix}:workers"

    @property
    def channel(self) -> str:
        """Pub/sub channel of membership events."""
        return f"{self.prefix}:events"
