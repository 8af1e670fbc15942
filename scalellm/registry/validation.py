"""Checks on what workers register and report; each failure names the field and the rule."""

from __future__ import annotations

import math
import re

from scalellm.registry.errors import InvalidRegistration
from scalellm.registry.records import WorkerInfo, WorkerLoad, WorkerRole

MAX_KV_CAPACITY_BLOCKS = 10**9
MAX_KV_BLOCK_SIZE = 65536
MAX_VERSION_LEN = 64
MAX_MODEL_LEN = 512
_WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")


def validate_worker_id(worker_id: str) -> None:
    """Non-empty, at most 128 characters from [A-Za-z0-9._:@-] (it becomes part of a Redis key)."""
    if not worker_id:
        raise InvalidRegistration("worker_id is empty")
    if not _WORKER_ID.fullmatch(worker_id):
        raise InvalidRegistration(
            f"worker_id {worker_id!r} is invalid: use 1-128 characters from [A-Za-z0-9._:@-]"
        )


def check_host_port(value: str, field_name: str) -> None:
    """`host:port` or `[ipv6]:port` with a port in 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRegistration(f"{field_name} {value!r} is not host:port (port 1..65535)")


def check_grpc_address(value: str) -> None:
    """A gRPC target this mesh can dial: host:port, [ipv6]:port or unix:path."""
    if not value:
        raise InvalidRegistration("grpc_address is empty")
    if value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise InvalidRegistration("grpc_address 'unix:' names no socket path")
        return
    check_host_port(value, "grpc_address")


def validate_worker_info(info: WorkerInfo) -> None:
    """Raise InvalidRegistration unless every field of info is usable."""
    validate_worker_id(info.worker_id)
    if not isinstance(info.role, WorkerRole):
        raise InvalidRegistration(f"role {info.role!r} is unknown (expected PREFILL, DECODE or BOTH)")
    if not info.model.strip():
        raise InvalidRegistration("model is empty")
    if len(info.model) > MAX_MODEL_LEN:
        raise InvalidRegistration(f"model is longer than {MAX_MODEL_LEN} characters")
    check_grpc_address(info.grpc_address)
    # Decode workers host the KV rendezvous that prefill workers join; the others need none.
    if info.transfer_endpoint or info.role is WorkerRole.DECODE:
        if not info.transfer_endpoint:
            raise InvalidRegistration(f"transfer_endpoint is empty (required for role {info.role.name})")
        check_host_port(info.transfer_endpoint, "transfer_endpoint")
    if not 0 < info.kv_capacity_blocks <= MAX_KV_CAPACITY_BLOCKS:
        raise InvalidRegistration(
            f"kv_capacity_blocks {info.kv_capacity_blocks} is out of range 1..{MAX_KV_CAPACITY_BLOCKS}"
        )
    if not 0 < info.kv_block_size <= MAX_KV_BLOCK_SIZE:
        raise InvalidRegistration(
            f"kv_block_size {info.kv_block_size} is out of range 1..{MAX_KV_BLOCK_SIZE}"
        )
    if len(info.version) > MAX_VERSION_LEN:
        raise InvalidRegistration(f"version is longer than {MAX_VERSION_LEN} characters")
    if info.max_running < 0:
        raise InvalidRegistration(f"max_running {info.max_running} is negative")


def validate_load(load: WorkerLoad) -> None:
    """Counts are non-negative; the rate and the latencies are finite non-negative numbers."""
    for name in ("running", "waiting", "free_blocks", "prefill_backlog_tokens"):
        if getattr(load, name) < 0:
            raise InvalidRegistration(f"load.{name} {getattr(load, name)} is negative")
    for name in ("tokens_per_second", "ttft_s", "itl_s"):
        value = getattr(load, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidRegistration(f"load.{name} {value} is not a finite number >= 0")
