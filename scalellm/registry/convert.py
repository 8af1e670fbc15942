"""Conversions between the typed records and the scalellm.v1 registry protobuf messages."""

from __future__ import annotations

from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from scalellm.kvhash import BlockHashDelta, from_wire, to_wire
from scalellm.registry.errors import InvalidRegistration
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
from scalellm.v1 import registry_pb2 as pb


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _seconds(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def role_to_proto(role: WorkerRole) -> pb.WorkerRole:
    """WorkerRole's values are the wire numbers (the generated stubs type enum fields by class)."""
    return cast(pb.WorkerRole, role.value)


def role_from_proto(value: int) -> WorkerRole:
    """The wire role number to WorkerRole; InvalidRegistration for UNSPECIFIED or unknown numbers."""
    try:
        return WorkerRole(value)
    except ValueError:
        raise InvalidRegistration(f"role {value} is unknown (expected PREFILL, DECODE or BOTH)") from None


def info_to_proto(info: WorkerInfo) -> pb.WorkerInfo:
    """WorkerInfo to its wire message."""
    return pb.WorkerInfo(
        worker_id=info.worker_id,
        role=role_to_proto(info.role),
        model=info.model,
        grpc_address=info.grpc_address,
        transfer_endpoint=info.transfer_endpoint,
        kv_capacity_blocks=info.kv_capacity_blocks,
        kv_block_size=info.kv_block_size,
        version=info.version,
        max_running=info.max_running,
    )


def info_from_proto(msg: pb.WorkerInfo) -> WorkerInfo:
    """The wire message to WorkerInfo (role checked here; the rest by validate_worker_info)."""
    return WorkerInfo(
        worker_id=msg.worker_id,
        role=role_from_proto(msg.role),
        model=msg.model,
        grpc_address=msg.grpc_address,
        transfer_endpoint=msg.transfer_endpoint,
        kv_capacity_blocks=msg.kv_capacity_blocks,
        kv_block_size=msg.kv_block_size,
        version=msg.version,
        max_running=msg.max_running,
    )


def load_to_proto(load: WorkerLoad) -> pb.Load:
    """WorkerLoad to its wire message."""
    return pb.Load(
        running=load.running,
        waiting=load.waiting,
        free_blocks=load.free_blocks,
        tokens_per_second=load.tokens_per_second,
        prefill_backlog_tokens=load.prefill_backlog_tokens,
        ttft_seconds=load.ttft_s,
        itl_seconds=load.itl_s,
        updated=_timestamp(load.updated_at),
    )


def load_from_proto(msg: pb.Load) -> WorkerLoad:
    """The wire message to WorkerLoad."""
    return WorkerLoad(
        running=msg.running,
        waiting=msg.waiting,
        free_blocks=msg.free_blocks,
        tokens_per_second=msg.tokens_per_second,
        prefill_backlog_tokens=msg.prefill_backlog_tokens,
        ttft_s=msg.ttft_seconds,
        itl_s=msg.itl_seconds,
        updated_at=_seconds(msg.updated),
    )


def record_to_proto(record: WorkerRecord) -> pb.Worker:
    """WorkerRecord to its wire message."""
    return pb.Worker(
        info=info_to_proto(record.info),
        load=load_to_proto(record.load),
        registered=_timestamp(record.registered_at),
    )


def record_from_proto(msg: pb.Worker) -> WorkerRecord:
    """The wire message to WorkerRecord."""
    return WorkerRecord(
        info=info_from_proto(msg.info),
        load=load_from_proto(msg.load),
        registered_at=_seconds(msg.registered),
    )


def delta_to_proto(delta: BlockHashDelta) -> pb.BlockHashDelta:
    """BlockHashDelta to its wire message (signed hashes to fixed64)."""
    return pb.BlockHashDelta(
        added=[to_wire(h) for h in delta.added],
        removed=[to_wire(h) for h in delta.removed],
        reset=delta.reset,
    )


def delta_from_proto(msg: pb.BlockHashDelta) -> BlockHashDelta:
    """The wire message to BlockHashDelta."""
    return BlockHashDelta(
        tuple(from_wire(u) for u in msg.added), tuple(from_wire(u) for u in msg.removed), msg.reset
    )


def event_to_proto(event: WorkerEvent) -> pb.WorkerEvent:
    """WorkerEvent to its wire message."""
    msg = pb.WorkerEvent(
        type=cast(pb.WorkerEventType, event.type.value),  # EventType's values are the wire numbers
        worker_id=event.worker_id,
        snapshot=[record_to_proto(r) for r in event.snapshot],
        lease_ms=round(event.lease_s * 1000),
        snapshot_blocks=[
            pb.WorkerBlocks(worker_id=b.worker_id, hashes=[to_wire(h) for h in b.hashes])
            for b in event.snapshot_blocks
        ],
    )
    if event.worker is not None:
        msg.worker.CopyFrom(record_to_proto(event.worker))
    if event.blocks is not None:
        msg.blocks.CopyFrom(delta_to_proto(event.blocks))
    return msg


def event_from_proto(msg: pb.WorkerEvent) -> WorkerEvent:
    """The wire message to WorkerEvent."""
    return WorkerEvent(
        type=EventType(msg.type),
        worker_id=msg.worker_id,
        worker=record_from_proto(msg.worker) if msg.HasField("worker") else None,
        snapshot=tuple(record_from_proto(w) for w in msg.snapshot),
        lease_s=msg.lease_ms / 1000,
        blocks=delta_from_proto(msg.blocks) if msg.HasField("blocks") else None,
        snapshot_blocks=tuple(
            WorkerBlocks(b.worker_id, tuple(from_wire(u) for u in b.hashes)) for b in msg.snapshot_blocks
        ),
    )


def lease_from_response(worker_id: str, msg: pb.RegisterResponse) -> Lease:
    """RegisterResponse to a Lease."""
    return Lease(
        worker_id=worker_id,
        lease_id=msg.lease_id,
        lease_s=msg.lease_ms / 1000,
        heartbeat_interval_s=msg.heartbeat_interval_ms / 1000,
    )
