"""Store keys and control messages of the TCPStore rendezvous the decode worker hosts.

Keys (``d`` decode id, ``p`` prefill id, ``e`` epoch)::

    epoch/d/p              counter; the decode side bumps it to open a new channel
    pair/d/p/e/layout/0    decode's KVLayout (JSON), written when epoch e opens
    pair/d/p/e/layout/1    prefill's KVLayout, written before it joins
    pair/d/p/e/claim       counter; the first prefill process to claim epoch e owns it
    pair/d/p/e/ctl         queue of ControlMessage, prefill -> decode (and local wake-ups);
                           a SEND carries the transfer's frame (sizes and destination runs)
    pair/d/p/e/auth/0      "hmac-sha256" when the decode side requires the mesh token, else "none"
    pair/d/p/e/nonce/0     the decode side's nonce of epoch e
    pair/d/p/e/verdict/0   the decode side's answer to an authenticated JOIN (see auth.py)
    pair/d/p/e/pg/...      the process group's own rendezvous keys (signed with a token)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import torch.distributed as dist

from scalellm.transfer.errors import ProtocolError

LAYOUT_KEYS = ("layout/0", "layout/1")  # indexed by rank
CLAIM_KEY = "claim"
CONTROL_KEY = "ctl"
GROUP_PREFIX = "pg"


class Control(Enum):
    """What a control message announces to the decode side's receiver."""

    JOIN = "J"  # the prefill side wrote its layout and is building the process group
    SEND = "S"  # a transfer follows on the process group; the message carries its frame
    RESET = "R"  # a new prefill process wants this epoch replaced by a fresh one
    CLOSE = "C"  # local wake-up: the channel is closing


@dataclass(frozen=True)
class ControlMessage:
    kind: Control
    transfer_id: int = 0
    frame: str = ""
    """SEND: the encoded :class:`~scalellm.transfer.wire.Frame`; JOIN and RESET: the sender's
    nonce (no ``:`` inside)."""
    mac: str = ""
    """With a mesh token: the message's HMAC tag (see auth.py); empty without one."""

    @property
    def signed_part(self) -> str:
        return f"{self.kind.value}:{self.transfer_id}:{self.frame}"

    def encode(self) -> str:
        return f"{self.signed_part}:{self.mac}"

    @classmethod
    def decode(cls, raw: bytes) -> ControlMessage:
        try:
            kind, tid, frame, mac = raw.decode().split(":")
            return cls(Control(kind), int(tid), frame, mac)
        except ValueError as exc:
            raise ProtocolError(f"bad control message {raw!r}") from exc


@dataclass(frozen=True)
class Endpoint:
    """``host:port`` of a decode worker's transfer store."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str | Endpoint) -> Endpoint:
        if isinstance(text, Endpoint):
            return text
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"transfer endpoint must be host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PairKeys:
    """Names of one (decode, prefill) pair in the store."""

    decode_id: str
    prefill_id: str

    def __post_init__(self) -> None:
        for name in (self.decode_id, self.prefill_id):
            if not name or "/" in name:
                raise ValueError(f"worker id must be non-empty and free of '/': {name!r}")

    @property
    def epoch_key(self) -> str:
        return f"epoch/{self.decode_id}/{self.prefill_id}"

    def epoch_store(self, store: dist.Store, epoch: int) -> dist.PrefixStore:
        return dist.PrefixStore(f"pair/{self.decode_id}/{self.prefill_id}/{epoch}", store)


def push(store: dist.Store, message: ControlMessage) -> None:
    store.queue_push(CONTROL_KEY, message.encode())


def next_control(store: dist.Store, timeout: timedelta) -> ControlMessage | None:
    """Pop the next control message, waiting at most ``timeout``; None if none came."""
    try:
        store.wait([CONTROL_KEY], timeout)
    except dist.DistStoreError:
        if store.queue_len(CONTROL_KEY) == 0:
            return None
    return ControlMessage.decode(store.queue_pop(CONTROL_KEY, False))


def drain_controls(store: dist.Store) -> list[ControlMessage]:
    """Pop every queued control message without waiting (skipping malformed ones)."""
    messages = []
    while store.queue_len(CONTROL_KEY) > 0:
        with contextlib.suppress(ProtocolError):
            messages.append(ControlMessage.decode(store.queue_pop(CONTROL_KEY, False)))
    return messages


def wait_key(store: dist.Store, key: str, timeout: timedelta) -> bool:
    """Whether ``key`` appeared within ``timeout``."""
    try:
        store.wait([key], timeout)
    except dist.DistStoreError:
        return False
    return True
