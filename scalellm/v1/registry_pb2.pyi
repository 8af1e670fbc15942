import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_BOTH: _ClassVar[WorkerRole]

class WorkerEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_EVENT_TYPE_UNSPECIFIED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_SNAPSHOT: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_JOINED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_LEFT: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_EXPIRED: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_LOAD: _ClassVar[WorkerEventType]
    WORKER_EVENT_TYPE_BLOCKS: _ClassVar[WorkerEventType]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_BOTH: WorkerRole
WORKER_EVENT_TYPE_UNSPECIFIED: WorkerEventType
WORKER_EVENT_TYPE_SNAPSHOT: WorkerEventType
WORKER_EVENT_TYPE_JOINED: WorkerEventType
WORKER_EVENT_TYPE_LEFT: WorkerEventType
WORKER_EVENT_TYPE_EXPIRED: WorkerEventType
WORKER_EVENT_TYPE_LOAD: WorkerEventType
WORKER_EVENT_TYPE_BLOCKS: WorkerEventType

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "model", "grpc_address", "transfer_endpoint", "kv_capacity_blocks", "kv_block_size", "version", "max_running")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    model: str
    grpc_address: str
    transfer_endpoint: str
    kv_capacity_blocks: int
    kv_block_size: int
    version: str
    max_running: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., model: _Optional[str] = ..., grpc_address: _Optional[str] = ..., transfer_endpoint: _Optional[str] = ..., kv_capacity_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., version: _Optional[str] = ..., max_running: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running", "waiting", "free_blocks", "tokens_per_second", "updated", "prefill_backlog_tokens", "ttft_seconds", "itl_seconds")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BACKLOG_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ITL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    free_blocks: int
    tokens_per_second: float
    updated: _timestamp_pb2.Timestamp
    prefill_backlog_tokens: int
    ttft_seconds: float
    itl_seconds: float
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_blocks: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prefill_backlog_tokens: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., itl_seconds: _Optional[float] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("info", "load", "registered")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    load: Load
    registered: _timestamp_pb2.Timestamp
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., registered: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "load", "blocks")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    load: Load
    blocks: BlockHashDelta
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., blocks: _Optional[_Union[BlockHashDelta, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_id", "lease_ms", "heartbeat_interval_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_ms: int
    heartbeat_interval_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "lease_id", "load", "blocks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_id: str
    load: Load
    blocks: BlockHashDelta
    def __init__(self, worker_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., blocks: _Optional[_Union[BlockHashDelta, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ms", "heartbeat_interval_ms")
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    heartbeat_interval_ms: int
    def __init__(self, lease_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id", "lease_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_id: str
    def __init__(self, worker_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("model", "role")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: WorkerRole
    def __init__(self, model: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class WatchWorkersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("type", "worker_id", "worker", "snapshot", "lease_ms", "blocks", "snapshot_blocks")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    type: WorkerEventType
    worker_id: str
    worker: Worker
    snapshot: _containers.RepeatedCompositeFieldContainer[Worker]
    lease_ms: int
    blocks: BlockHashDelta
    snapshot_blocks: _containers.RepeatedCompositeFieldContainer[WorkerBlocks]
    def __init__(self, type: _Optional[_Union[WorkerEventType, str]] = ..., worker_id: _Optional[str] = ..., worker: _Optional[_Union[Worker, _Mapping]] = ..., snapshot: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., lease_ms: _Optional[int] = ..., blocks: _Optional[_Union[BlockHashDelta, _Mapping]] = ..., snapshot_blocks: _Optional[_Iterable[_Union[WorkerBlocks, _Mapping]]] = ...) -> None: ...

class BlockHashDelta(_message.Message):
    __slots__ = ("added", "removed", "reset")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    reset: bool
    def __init__(self, added: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ..., reset: _Optional[bool] = ...) -> None: ...

class WorkerBlocks(_message.Message):
    __slots__ = ("worker_id", "hashes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker_id: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...
