"""RegistryStore: the registry's state and rules over Redis, with no gRPC in sight.

The kvstore servicer is a thin layer over this class, and tests drive it directly. It holds no
state of its own: any number of kvstore replicas can share one Redis.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from google.protobuf.message import DecodeError

from scalellm.kvhash import BlockHashDelta, from_wire, to_wire
from scalellm.registry import scripts
from scalellm.registry.backend import RedisBackend
from scalellm.registry.convert import (
    delta_to_proto,
    info_from_proto,
    info_to_proto,
    load_from_proto,
    load_to_proto,
    record_to_proto,
)
from scalellm.registry.errors import InvalidRegistration, LeaseSuperseded, LeaseUnknown
from scalellm.registry.keys import RegistryKeys
from scalellm.registry.records import (
    Lease,
    WorkerBlocks,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerRole,
)
from scalellm.registry.subscription import EventSubscription
from scalellm.registry.validation import validate_load, validate_worker_id, validate_worker_info
from scalellm.v1 import registry_pb2 as pb

log = logging.getLogger(__name__)


class RegistryStore:
    """Register, renew, remove, list and expire workers; every change is announced on the channel.

    Redis failures raise BackendUnavailable; bad input raises InvalidRegistration; heartbeats on a
    lost lease raise LeaseUnknown, on a replaced one LeaseSuperseded.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        lease_s: float,
        namespace: str = "scalellm",
        heartbeat_fraction: float = 1 / 3,
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self.heartbeat_interval_s = lease_s * heartbeat_fraction
        self.keys = RegistryKeys(namespace)
        self.backend = RedisBackend(redis_url, connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s)
        self._clock = clock
        redis = self.backend.redis
        self._register = redis.register_script(scripts.REGISTER)
        self._heartbeat = redis.register_script(scripts.HEARTBEAT)
        self._deregister = redis.register_script(scripts.DEREGISTER)
        self._reap = redis.register_script(scripts.REAP)
        self._snapshot = redis.register_script(scripts.SNAPSHOT)

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def _lease(self, worker_id: str, lease_id: str) -> Lease:
        return Lease(
            worker_id=worker_id,
            lease_id=lease_id,
            lease_s=self.lease_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
        )

    def _stamped(self, load: WorkerLoad | None) -> WorkerLoad:
        load = load or WorkerLoad()
        validate_load(load)
        return replace(load, updated_at=self._clock())

    async def register(
        self, info: WorkerInfo, load: WorkerLoad | None = None, blocks: tuple[int, ...] = ()
    ) -> Lease:
        """Register info (replacing a registration of the same id) and grant a fresh lease;
        ``blocks``: the block hashes the worker holds now (its whole set)."""
        validate_worker_info(info)
        reset = BlockHashDelta(tuple(blocks), (), reset=True)
        record = WorkerRecord(info=info, load=self._stamped(load), registered_at=self._clock())
        lease_id = secrets.token_hex(8)
        args: list[str | int | bytes] = [
            info.worker_id,
            lease_id,
            self._lease_ms,
            info_to_proto(info).SerializeToString(),
            load_to_proto(record.load).SerializeToString(),
            round(record.registered_at * 1000),
            self.keys.channel,
            record_to_proto(record).SerializeToString(),
            delta_to_proto(reset).SerializeToString(),
            *(to_wire(h) for h in reset.added),
        ]
        keys = [self.keys.worker(info.worker_id), self.keys.index, self.keys.blocks(info.worker_id)]
        async with self.backend.guard():
            await self._register(keys=keys, args=args)
        log.info("registered %s (%s, %s)", info.worker_id, info.role.name, info.grpc_address)
        return self._lease(info.worker_id, lease_id)

    async def heartbeat(
        self, worker_id: str, lease_id: str, load: WorkerLoad, blocks: BlockHashDelta | None = None
    ) -> Lease:
        """Renew the lease, record load and apply the change to the worker's block hashes;
        LeaseUnknown / LeaseSuperseded when the lease is not ours (nothing is applied then)."""
        _validate_lease_ref(worker_id, lease_id)
        payload = load_to_proto(self._stamped(load)).SerializeToString()
        keys = [self.keys.worker(worker_id), self.keys.index, self.keys.blocks(worker_id)]
        delta = blocks if blocks is not None and not blocks.empty else BlockHashDelta()
        args: list[str | int | bytes] = [
            worker_id,
            lease_id,
            self._lease_ms,
            payload,
            self.keys.channel,
            b"" if delta.empty else delta_to_proto(delta).SerializeToString(),
            "1" if delta.reset else "0",
            len(delta.added),
            *(to_wire(h) for h in delta.added),
            *(to_wire(h) for h in delta.removed),
        ]
        async with self.backend.guard():
            result = await self._heartbeat(keys=keys, args=args)
        if result == 0:
            raise LeaseUnknown(f"lease of worker {worker_id!r} is unknown (expired or lost): register again")
        if result < 0:
            raise LeaseSuperseded(f"worker {worker_id!r} was registered again by another process")
        return self._lease(worker_id, lease_id)

    async def deregister(self, worker_id: str, lease_id: str) -> bool:
        """Remove the registration holding lease_id; False if it is gone or was replaced."""
        _validate_lease_ref(worker_id, lease_id)
        keys = [self.keys.worker(worker_id), self.keys.index, self.keys.blocks(worker_id)]
        async with self.backend.guard():
            result = await self._deregister(keys=keys, args=[worker_id, lease_id, self.keys.channel])
        if result > 0:
            log.info("deregistered %s", worker_id)
        return result > 0

    async def list_workers(
        self, model: str | None = None, role: WorkerRole | None = None
    ) -> list[WorkerRecord]:
        """Live workers sorted by id, optionally only one model's and / or one role's."""
        async with self.backend.guard():
            rows = await self._snapshot(keys=[self.keys.index], args=[self.keys.worker_prefix])
        records = [r for r in map(_record_from_row, rows) if r is not None]
        return sorted(
            (
                r
                for r in records
                if (not model or r.info.model == model) and (role is None or r.info.role is role)
            ),
            key=lambda r: r.worker_id,
        )

    async def block_sets(self, worker_ids: list[str]) -> tuple[WorkerBlocks, ...]:
        """The block hashes each of the workers holds (one round trip)."""
        async with self.backend.guard(), self.backend.redis.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.smembers(self.keys.blocks(worker_id))
            members = await pipe.execute()
        return tuple(
            WorkerBlocks(worker_id, tuple(from_wire(int(m)) for m in found))
            for worker_id, found in zip(worker_ids, members, strict=True)
        )

    async def reap_expired(self, limit: int = 100) -> list[str]:
        """Announce EXPIRED for up to `limit` workers whose lease ran out; returns their ids."""
        async with self.backend.guard():
            ids = await self._reap(
                keys=[self.keys.index],
                args=[self.keys.worker_prefix, self.keys.channel, limit, self.keys.blocks_prefix],
            )
        expired = [i.decode() for i in ids]
        for worker_id in expired:
            log.info("lease of %s expired", worker_id)
        return expired

    async def count(self) -> int:
        """Number of registrations in the lease index (expired ones until reaped)."""
        async with self.backend.guard():
            return int(await self.backend.redis.zcard(self.keys.index))

    async def ping(self) -> None:
        """Return if Redis answers; BackendUnavailable otherwise."""
        async with self.backend.guard():
            await self.backend.redis.ping()

    def subscribe(self) -> EventSubscription:
        """A subscription to membership events (use `async with`)."""
        return EventSubscription(self.backend, self.keys.channel)

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self.backend.aclose()


def _validate_lease_ref(worker_id: str, lease_id: str) -> None:
    validate_worker_id(worker_id)
    if not lease_id:
        raise InvalidRegistration("lease_id is empty: pass the lease_id that Register returned")


def _record_from_row(row: list[bytes]) -> WorkerRecord | None:
    """One SNAPSHOT script row {id, info, load, registered_ms} to a record (None if unreadable)."""
    try:
        info = info_from_proto(pb.WorkerInfo.FromString(row[1]))
        load = load_from_proto(pb.Load.FromString(row[2] or b""))
        return WorkerRecord(info=info, load=load, registered_at=int(row[3] or 0) / 1000)
    except (InvalidRegistration, DecodeError, ValueError, IndexError) as exc:
        log.warning("skipping an unreadable registration %r: %s", row[:1], exc)
        return None
