"""KV-cache transfer between prefill and decode workers over 2-rank torch.distributed pair groups.

Decode side: :class:`TransferServer` hosts the rendezvous store and lands pushed KV in reserved
blocks. Prefill side: :class:`TransferClient` pushes KV to a decode worker by id and endpoint.
See docs/transfer.md for the protocol.
"""

from scalellm.transfer.channel import ChannelState, CompleteCallback, ErrorCallback, Resolver
from scalellm.transfer.client import TransferClient
from scalellm.transfer.config import ChannelConfig, Transport
from scalellm.transfer.errors import (
    AuthenticationError,
    ChannelBrokenError,
    ChannelClosedError,
    ProtocolError,
    TransferError,
)
from scalellm.transfer.layout import PROTOCOL_VERSION, FieldDiff, KVLayout, LayoutMismatchError
from scalellm.transfer.receiver import DecodeChannel
from scalellm.transfer.rendezvous import Endpoint
from scalellm.transfer.sender import PrefillChannel
from scalellm.transfer.server import TransferServer
from scalellm.transfer.stats import CounterSnapshot, TransferCounters, TransferStats

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "ChannelBrokenError",
    "ChannelClosedError",
    "ChannelConfig",
    "ChannelState",
    "CompleteCallback",
    "CounterSnapshot",
    "DecodeChannel",
    "Endpoint",
    "ErrorCallback",
    "FieldDiff",
    "KVLayout",
    "LayoutMismatchError",
    "PrefillChannel",
    "ProtocolError",
    "Resolver",
    "TransferClient",
    "TransferCounters",
    "TransferError",
    "TransferServer",
    "TransferStats",
    "Transport",
]
