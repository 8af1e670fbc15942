"""Tunables of a pair channel and the choice of transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

import torch


class Transport(Enum):
    """The torch.distributed backend a pair group is built on."""

    GLOO = "gloo"
    NCCL = "nccl"


@dataclass(frozen=True)
class ChannelConfig:
    """Timeouts and transport of a pair channel (same values on both ends is simplest)."""

    op_timeout_s: float = 30.0
    """Limit of every blocking send/recv; hitting it breaks the channel."""
    connect_timeout_s: float = 60.0
    """Limit of the rendezvous (store connection, epoch wait, process-group construction)."""
    idle_wait_s: float = 600.0
    """How long one idle wait on the control queue lasts before it is simply re-armed."""
    message_bytes: int = 1 << 20
    """Largest payload message (rounded down to whole blocks, at least one): a long run of blocks
    goes as several messages, so the receiver's copy out of the socket overlaps the sender's
    write (gloo over loopback moves 0.7 MB messages about twice as fast as one 94 MB message)."""
    transport: Transport | None = None
    """None: NCCL for CUDA caches, gloo otherwise. Gloo with a CUDA cache stages through CPU."""
    device_host: str | None = None
    """Address gloo binds and advertises to the peer; None: gloo's default (hostname lookup)."""
    auth_key: bytes | None = field(default=None, repr=False)
    """HMAC key both ends must hold (derived from the mesh token); None: pairs are not
    authenticated. A decode side with a key refuses peers without it (auth.py)."""

    def __post_init__(self) -> None:
        if self.message_bytes < 1:
            raise ValueError(f"message_bytes must be positive, got {self.message_bytes}")

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
