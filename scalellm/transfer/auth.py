"""Authenticating a pair channel with a shared key K (derived from the mesh token).

Anyone who reaches the decode worker's rendezvous store can write to it, so with a key every step
that could let KV in is proven with HMAC-SHA256 (``H``) over a fresh nonce from each side::

    D  open(e):     nonce/0 = n0, auth/0 = "hmac-sha256"
    P  join:        JOIN  n1 : H(K, "join" | T)            T = d, p, e, n0, n1, layout/0, layout/1
    D  on JOIN:     verdict/0 = H(K, "accept" | T), or "refused" (and the epoch ends)
    P               checks the verdict
    both            S = H(K, "session" | T); the process group's own rendezvous keys are signed
                    with S (SignedStore), so nobody can swap in another address or NCCL id;
                    then over the new group P sends H(S, "rank 1"), D checks it and answers
                    H(S, "rank 0"), P checks that: the connection reached the right process
    P  SEND/CLOSE:  message : H(S, message)   (a SEND's frame holds its sequence number)
    P  RESET:       n_r : H(K, "reset" | d, p, e, n0, n_r)   (a new process knows K, not S)

The decode side drops a message whose tag is wrong (counted as refused) and never posts a
receive for it; a JOIN with a wrong tag ends the epoch before any process group exists. The
payload is not authenticated byte by byte: once the group's connection has proven its peer, KV
moves over it at full speed. Tags are compared only with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from typing import Final

import torch
import torch.distributed as dist

from scalellm.transfer.errors import AuthenticationError
from scalellm.transfer.group import PREFILL_RANK, PairGroup
from scalellm.transfer.rendezvous import Control, ControlMessage, PairKeys
from scalellm.transfer.signed_store import TAG_BYTES, SignedStore

SCHEME: Final[str] = "hmac-sha256"
NO_AUTH: Final[str] = "none"
AUTH_KEY, NONCE_KEY, VERDICT_KEY = "auth/0", "nonce/0", "verdict/0"
REFUSED: Final[str] = "refused"


def new_nonce() -> str:
    return secrets.token_hex(16)


def _tag(key: bytes, label: str, *parts: str | bytes) -> str:
    mac = hmac.new(key, label.encode(), hashlib.sha256)
    for part in parts:  # length-prefixed, so no two sequences of parts read alike
        raw = part.encode() if isinstance(part, str) else part
        mac.update(len(raw).to_bytes(8, "big") + raw)
    return mac.hexdigest()


def _same(tag: str, expected: str) -> bool:
    return hmac.compare_digest(tag.encode(), expected.encode())


@dataclass(frozen=True)
class Transcript:
    """What both sides agreed on while joining an epoch; every later tag is bound to it."""

    keys: PairKeys
    epoch: int
    nonce0: str
    nonce1: str
    layout0: bytes
    layout1: bytes

    def _parts(self) -> tuple[str | bytes, ...]:
        ids = (self.keys.decode_id, self.keys.prefill_id, str(self.epoch))
        return (*ids, self.nonce0, self.nonce1, self.layout0, self.layout1)

    def join(self, key: bytes) -> ControlMessage:
        return ControlMessage(Control.JOIN, 0, self.nonce1, _tag(key, "join", *self._parts()))

    def join_is_valid(self, key: bytes, msg: ControlMessage) -> bool:
        return _same(msg.mac, _tag(key, "join", *self._parts()))

    def accept_tag(self, key: bytes) -> str:
        return _tag(key, "accept", *self._parts())

    def verdict_is_valid(self, key: bytes, verdict: str) -> bool:
        return _same(verdict, self.accept_tag(key))

    def session(self, key: bytes) -> PairSession:
        return PairSession(bytes.fromhex(_tag(key, "session", *self._parts())))


@dataclass(frozen=True)
class EpochKey:
    """K and the facts of one epoch known before anyone joined it (what a RESET can be bound to)."""

    key: bytes
    keys: PairKeys
    epoch: int
    nonce0: str

    def _reset_tag(self, nonce: str) -> str:
        k = self.keys
        return _tag(self.key, "reset", k.decode_id, k.prefill_id, str(self.epoch), self.nonce0, nonce)

    def reset(self) -> ControlMessage:
        nonce = new_nonce()
        return ControlMessage(Control.RESET, 0, nonce, self._reset_tag(nonce))

    def reset_is_valid(self, msg: ControlMessage) -> bool:
        return _same(msg.mac, self._reset_tag(msg.frame))


@dataclass(frozen=True)
class PairSession:
    """One authenticated epoch: seals and checks control messages, signs the group's rendezvous."""

    key: bytes

    def seal(self, msg: ControlMessage) -> ControlMessage:
        return replace(msg, mac=_tag(self.key, "control", msg.signed_part))

    def is_sealed(self, msg: ControlMessage) -> bool:
        return _same(msg.mac, _tag(self.key, "control", msg.signed_part))

    def signed(self, store: dist.Store) -> dist.Store:
        return SignedStore(store, self.key)

    def prove_group(self, group: PairGroup) -> None:
        """Exchange tags over the new group (prefill first); AuthenticationError if the peer's is wrong."""
        mine = bytes.fromhex(_tag(self.key, f"rank {group.rank}"))
        expected = bytes.fromhex(_tag(self.key, f"rank {group.peer}"))
        if group.rank == PREFILL_RANK:
            group.wait(group.send(_tensor(mine, group.wire_device)))
            _check(_receive(group), expected)
        else:
            _check(_receive(group), expected)
            group.wait(group.send(_tensor(mine, group.wire_device)))


def _tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _receive(group: PairGroup) -> bytes:
    buffer = torch.zeros(TAG_BYTES, dtype=torch.uint8, device=group.wire_device)
    group.wait(group.recv(buffer))
    return bytes(buffer.cpu().tolist())


def _check(tag: bytes, expected: bytes) -> None:
    if not hmac.compare_digest(tag, expected):
        raise AuthenticationError("the peer on the KV transfer connection could not prove the mesh token")


class DecodeGate:
    """The decode side's checks for one epoch (every method passes everything without a key)."""

    def __init__(self, key: bytes | None, keys: PairKeys, epoch: int, nonce0: str) -> None:
        self._epoch = EpochKey(key, keys, epoch, nonce0) if key else None
        self.session: PairSession | None = None

    @property
    def enabled(self) -> bool:
        return self._epoch is not None

    def admits(self, msg: ControlMessage) -> bool:
        """Whether a RESET, SEND or CLOSE from the peer carries a valid tag (JOIN: see accept)."""
        if self._epoch is None or msg.kind is Control.JOIN:
            return True
        if msg.kind is Control.RESET:
            return self._epoch.reset_is_valid(msg)
        return self.session is not None and self.session.is_sealed(msg)

    def accept(self, store: dist.Store, join: ControlMessage, layout0: bytes, layout1: bytes) -> None:
        """Check a JOIN and write the verdict; AuthenticationError (verdict "refused") if it is wrong."""
        if self._epoch is None:
            return
        e = self._epoch
        transcript = Transcript(e.keys, e.epoch, e.nonce0, join.frame, layout0, layout1)
        if not transcript.join_is_valid(e.key, join):
            store.set(VERDICT_KEY, REFUSED)
            raise AuthenticationError(
                f"prefill worker {e.keys.prefill_id} could not prove the mesh token: its KV channel is refused"
            )
        store.set(VERDICT_KEY, transcript.accept_tag(e.key))
        self.session = transcript.session(e.key)

    def group_store(self, store: dist.Store) -> dist.Store:
        return self.session.signed(store) if self.session else store

    def prove_group(self, group: PairGroup) -> None:
        if self.session is not None:
            self.session.prove_group(group)
