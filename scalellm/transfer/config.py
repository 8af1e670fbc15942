"""Tunables of a pair channel and the choice of transport."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import torch


class Transport(Enum):
    """The torch.distributed backend a pair group is built on."""

    GLOO = "gloo"
    NCCL = "nccl"


@dataclass(frozen=True)
class ChannelConfig:
    """Timeouts and pipelining of a pair channel (same values on both ends is simplest)."""

    op_timeout_s: float = 30.0
    """Limit of every blocking send/recv; hitting it breaks the channel."""
    connect_timeout_s: float = 60.0
    """Limit of the rendezvous (store connection, epoch wait, process-group construction)."""
    idle_wait_s: float = 600.0
    """How long one idle wait on the control queue lasts before it is simply re-armed."""
    layers_per_group: int | None = None
    """Layers per payload message; None: ``group_target_bytes`` per message, at most ``max_groups``."""
    group_target_bytes: int = 2 << 20
    """Approximate payload bytes per message when ``layers_per_group`` is None."""
    max_groups: int = 8
    """Most messages one transfer's payload is split into (each costs a handshake)."""
    inflight_bytes: int = 64 << 20
    """Budget of payload buffers on the wire at once per channel end (at least 2 groups)."""
    transport: Transport | None = None
    """None: NCCL for CUDA caches, gloo otherwise. Gloo with a CUDA cache stages through CPU."""
    device_host: str | None = None
    """Address gloo binds and advertises to the peer; None: gloo's default (hostname lookup)."""

    def __post_init__(self) -> None:
        if self.max_groups < 1 or self.group_target_bytes < 1 or self.inflight_bytes < 1:
            raise ValueError("max_groups, group_target_bytes and inflight_bytes must be positive")
        if self.layers_per_group is not None and self.layers_per_group < 1:
            raise ValueError("layers_per_group must be >= 1")

    @property
    def op_timeout(self) -> timedelta:
        return timedelta(seconds=self.op_timeout_s)

    @property
    def connect_timeout(self) -> timedelta:
        return timedelta(seconds=self.connect_timeout_s)

    @property
    def idle_wait(self) -> timedelta:
        return timedelta(seconds=self.idle_wait_s)

    def transport_for(self, device: torch.device) -> Transport:
        """The transport used for a KV cache on ``device``."""
        if self.transport is not None:
            return self.transport
        return Transport.NCCL if device.type == "cuda" else Transport.GLOO
