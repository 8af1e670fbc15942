"""Messages on the registry's Redis pub/sub channel, as the Lua scripts publish them.

    JOINED <worker_id> <scalellm.v1.Worker bytes>
    LOAD <worker_id> <scalellm.v1.Load bytes>
    BLOCKS <worker_id> <scalellm.v1.BlockHashDelta bytes>
    LEFT <worker_id>
    EXPIRED <worker_id>

Worker ids never contain a space (validation.py), so the first two spaces split the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from scalellm.kvhash import BlockHashDelta
from scalellm.registry.convert import delta_from_proto, load_from_proto, record_from_proto
from scalellm.registry.records import EventType, WorkerLoad, WorkerRecord
from scalellm.v1 import registry_pb2 as pb

_KINDS = {
    b"JOINED": EventType.JOINED,
    b"LOAD": EventType.LOAD,
    b"LEFT": EventType.LEFT,
    b"EXPIRED": EventType.EXPIRED,
    b"BLOCKS": EventType.BLOCKS,
}


@dataclass(frozen=True, slots=True)
class BusMessage:
    """One parsed channel message: JOINED carries the record, LOAD the new load, BLOCKS the delta."""

    type: EventType
    worker_id: str
    record: WorkerRecord | None = None
    load: WorkerLoad | None = None
    blocks: BlockHashDelta | None = None


def parse_bus_message(data: bytes) -> BusMessage:
    """Parse one channel message; ValueError if it is not one of the five forms."""
    kind, _, rest = data.partition(b" ")
    raw_id, _, payload = rest.partition(b" ")
    event_type = _KINDS.get(kind)
    if event_type is None or not raw_id:
        raise ValueError(f"not a registry bus message: {data[:60]!r}")
    worker_id = raw_id.decode()
    try:
        if event_type is EventType.JOINED:
            record = record_from_proto(pb.Worker.FromString(payload))
            return BusMessage(event_type, worker_id, record=record)
        if event_type is EventType.LOAD:
            return BusMessage(event_type, worker_id, load=load_from_proto(pb.Load.FromString(payload)))
        if event_type is EventType.BLOCKS:
            delta = delta_from_proto(pb.BlockHashDelta.FromString(payload))
            return BusMessage(event_type, worker_id, blocks=delta)
    except DecodeError as exc:
        raise ValueError(f"undecodable {kind.decode()} payload for {worker_id!r}: {exc}") from exc
    return BusMessage(event_type, worker_id)
