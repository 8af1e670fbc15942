"""The Registry gRPC servicer: protobuf in, RegistryStore call, protobuf out; errors to status codes."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from scalellm.registry.convert import (
    delta_from_proto,
    event_to_proto,
    info_from_proto,
    load_from_proto,
    record_to_proto,
    role_from_proto,
)
from scalellm.registry.errors import (
    BackendUnavailable,
    InvalidRegistration,
    LeaseSuperseded,
    LeaseUnknown,
    RegistryError,
)
from scalellm.registry.records import Lease
from scalellm.registry.store import RegistryStore
from scalellm.registry.watch import WorkerWatch
from scalellm.v1 import registry_pb2 as pb
from scalellm.v1 import registry_pb2_grpc as pb_grpc
from services.kvstore.metrics import KvstoreMetrics

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["RegistryServicer", Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def status_for(exc: RegistryError) -> grpc.StatusCode:
    """The gRPC status code that reports exc."""
    if isinstance(exc, InvalidRegistration):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LeaseUnknown):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, LeaseSuperseded):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map RegistryError to a status (with its message) and record the call's metrics."""

    @functools.wraps(handler)
    async def wrapper(self: RegistryServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await handler(self, request, context)
        except RegistryError as exc:
            code = status_for(exc)
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.metrics.observe_rpc(handler.__name__, code, time.perf_counter() - start)

    return wrapper


def _lease_ms(lease: Lease) -> tuple[int, int]:
    return round(lease.lease_s * 1000), round(lease.heartbeat_interval_s * 1000)


class RegistryServicer(pb_grpc.RegistryServicer):
    """scalellm.v1.Registry over a RegistryStore."""

    def __init__(self, store: RegistryStore, metrics: KvstoreMetrics) -> None:
        self.store = store
        self.metrics = metrics

    @_unary
    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        load = load_from_proto(request.load) if request.HasField("load") else None
        blocks = delta_from_proto(request.blocks).added
        lease = await self.store.register(info_from_proto(request.info), load, blocks)
        lease_ms, interval_ms = _lease_ms(lease)
        return pb.RegisterResponse(
            lease_id=lease.lease_id, lease_ms=lease_ms, heartbeat_interval_ms=interval_ms
        )

    @_unary
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        blocks = delta_from_proto(request.blocks) if request.HasField("blocks") else None
        lease = await self.store.heartbeat(
            request.worker_id, request.lease_id, load_from_proto(request.load), blocks
        )
        lease_ms, interval_ms = _lease_ms(lease)
        return pb.HeartbeatResponse(lease_ms=lease_ms, heartbeat_interval_ms=interval_ms)

    @_unary
    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        return pb.DeregisterResponse(removed=await self.store.deregister(request.worker_id, request.lease_id))

    @_unary
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkersResponse:
        role = role_from_proto(request.role) if request.role else None
        records = await self.store.list_workers(request.model or None, role)
        return pb.ListWorkersResponse(workers=[record_to_proto(r) for r in records])

    async def WatchWorkers(
        self, request: pb.WatchWorkersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerEvent]:
        self.metrics.watchers.inc()
        try:
            async for event in WorkerWatch(self.store, request.model or None).events():
                self.metrics.watch_events.labels(event.type.name).inc()
                yield event_to_proto(event)
        except RegistryError as exc:
            await context.abort(status_for(exc), str(exc))
        finally:
            self.metrics.watchers.dec()
