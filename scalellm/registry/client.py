"""RegistryClient: typed calls to the kvstore, moving to the next replica when one fails."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from scalellm.kvhash import BlockHashDelta
from scalellm.registry.convert import (
    delta_to_proto,
    event_from_proto,
    info_to_proto,
    lease_from_response,
    load_to_proto,
    record_from_proto,
    role_to_proto,
)
from scalellm.registry.errors import (
    InvalidRegistration,
    LeaseSuperseded,
    LeaseUnknown,
    RegistryError,
    RegistryUnavailable,
)
from scalellm.registry.records import Lease, WorkerEvent, WorkerInfo, WorkerLoad, WorkerRecord, WorkerRole
from scalellm.security import MeshSecurity
from scalellm.v1 import registry_pb2 as pb
from scalellm.v1 import registry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Reconnect quickly after a replica comes back (a restarted container may come back at another IP
# under the same name: re-resolve within a second, not gRPC's default 30 s). Keepalive pings come
# with every mesh channel (scalellm/keepalive.py).
# Never set grpc.min_reconnect_backoff_ms: gRPC takes its minimum connect timeout from it (default
# 20 s), and at 100 ms a kvstore slow to finish the handshake (loaded, far away) was unreachable.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
)

_DOMAIN_ERRORS: dict[grpc.StatusCode, type[RegistryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRegistration,
    grpc.StatusCode.NOT_FOUND: LeaseUnknown,
    grpc.StatusCode.FAILED_PRECONDITION: LeaseSuperseded,
}


def parse_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` to a tuple of addresses; ValueError if none."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    parsed = tuple(a.strip() for a in items if a.strip())
    if not parsed:
        raise ValueError("no kvstore address given")
    return parsed


class RegistryClient:
    """Calls the Registry service on one of several kvstore replicas.

    It sticks to the replica that last answered; when a call fails for any reason other than a
    domain error (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION), it tries the next address,
    and raises RegistryUnavailable once every address failed. Calls carry the mesh token and
    use mesh TLS when ``security`` has them.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        rpc_timeout_s: float = 2.0,
        security: MeshSecurity | None = None,
    ) -> None:
        self.addresses = parse_addresses(addresses)
        self._rpc_timeout_s = rpc_timeout_s
        self._security = security or MeshSecurity()
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def address(self) -> str:
        """The replica calls go to first."""
        return self.addresses[self._current]

    def _stub(self, address: str) -> pb_grpc.RegistryStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._security.channel(address, CHANNEL_OPTIONS)
        return pb_grpc.RegistryStub(channel)

    def _move_past(self, address: str) -> None:
        """Make the address after `address` the current one (unless someone moved already)."""
        if self.address == address:
            self._current = (self._current + 1) % len(self.addresses)

    async def _unary(self, method: str, request: object) -> object:
        failures: list[str] = []
        for _ in self.addresses:
            address = self.address
            try:
                return await getattr(self._stub(address), method)(
                    request, timeout=self._rpc_timeout_s, metadata=self._security.metadata
                )
            except grpc.aio.AioRpcError as exc:
                domain = _DOMAIN_ERRORS.get(exc.code())
                if domain is not None:
                    raise domain(exc.details() or exc.code().name) from exc
                failures.append(f"{address}: {exc.code().name}: {exc.details()}")
                log.debug("kvstore %s failed %s: %s", address, method, exc.details())
                self._move_past(address)
        raise RegistryUnavailable(f"{method} failed on every kvstore ({'; '.join(failures)})")

    async def register(
        self, info: WorkerInfo, load: WorkerLoad | None = None, blocks: tuple[int, ...] = ()
    ) -> Lease:
        """Register a worker (holding the block hashes ``blocks``); returns its lease."""
        request = pb.RegisterRequest(
            info=info_to_proto(info),
            load=load_to_proto(load or WorkerLoad()),
            blocks=delta_to_proto(BlockHashDelta(blocks, (), reset=True)),
        )
        response = await self._unary("Register", request)
        assert isinstance(response, pb.RegisterResponse)
        return lease_from_response(info.worker_id, response)

    async def heartbeat(self, lease: Lease, load: WorkerLoad, blocks: BlockHashDelta | None = None) -> Lease:
        """Renew a lease, report load and block-hash changes; LeaseUnknown means register again."""
        request = pb.HeartbeatRequest(
            worker_id=lease.worker_id, lease_id=lease.lease_id, load=load_to_proto(load)
        )
        if blocks is not None and not blocks.empty:
            request.blocks.CopyFrom(delta_to_proto(blocks))
        response = await self._unary("Heartbeat", request)
        assert isinstance(response, pb.HeartbeatResponse)
        return Lease(
            worker_id=lease.worker_id,
            lease_id=lease.lease_id,
            lease_s=response.lease_ms / 1000,
            heartbeat_interval_s=response.heartbeat_interval_ms / 1000,
        )

    async def deregister(self, lease: Lease) -> bool:
        """Remove the registration; False if it was already gone."""
        request = pb.DeregisterRequest(worker_id=lease.worker_id, lease_id=lease.lease_id)
        response = await self._unary("Deregister", request)
        assert isinstance(response, pb.DeregisterResponse)
        return response.removed

    async def list_workers(
        self, model: str | None = None, role: WorkerRole | None = None
    ) -> list[WorkerRecord]:
        """Live workers sorted by id, optionally filtered."""
        request = pb.ListWorkersRequest(
            model=model or "", role=role_to_proto(role) if role else pb.WORKER_ROLE_UNSPECIFIED
        )
        response = await self._unary("ListWorkers", request)
        assert isinstance(response, pb.ListWorkersResponse)
        return [record_from_proto(w) for w in response.workers]

    async def watch(self, model: str | None = None) -> AsyncIterator[WorkerEvent]:
        """One WatchWorkers stream on the current replica: the snapshot, then changes.

        Raises RegistryUnavailable when the stream fails (and moves to the next replica for the
        next attempt); reconnecting is the caller's job (WorkerView does it).
        """
        address = self.address
        call = self._stub(address).WatchWorkers(
            pb.WatchWorkersRequest(model=model or ""), metadata=self._security.metadata
        )
        try:
            async for message in call:
                yield event_from_proto(message)
        except grpc.aio.AioRpcError as exc:
            self._move_past(address)
            raise RegistryUnavailable(
                f"watch on {address} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
