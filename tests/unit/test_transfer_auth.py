"""KV-transfer pairs with a mesh token: a peer that cannot prove it is refused and lands nothing.

The decode side (a TransferServer) runs in this process, as do the prefill clients (threads of
their own) and the "attacker", a plain TCPStore client writing whatever it likes to the rendezvous.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from scalellm.transfer import (
    AuthenticationError,
    ChannelClosedError,
    ChannelConfig,
    ChannelState,
    KVLayout,
    TransferClient,
    TransferServer,
)
from scalellm.transfer.auth import VERDICT_KEY, PairSession
from scalellm.transfer.group import DECODE_RANK, PREFILL_RANK, open_pair_group
from scalellm.transfer.rendezvous import (
    CLAIM_KEY,
    CONTROL_KEY,
    LAYOUT_KEYS,
    Control,
    ControlMessage,
    PairKeys,
    push,
)
from scalellm.transfer.signed_store import SignedStore
from tests.sockets import listening

KEY, OTHER_KEY = b"k" * 32, b"o" * 32
BASE = ChannelConfig(op_timeout_s=5, connect_timeout_s=10, device_host="127.0.0.1")
SECURE = dataclasses.replace(BASE, auth_key=KEY)
SHAPE = (16, 2, 2, 4, 2, 8)  # blocks, layers, K/V, block size, heads, head dim


def cache(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


class Decode:
    """A TransferServer whose every resolve is recorded (a refused peer must cause none)."""

    def __init__(self, config: ChannelConfig) -> None:
        self.cache = cache(99)
        self.resolved: list[int] = []
        self.events: queue.Queue[tuple[str, int]] = queue.Queue()
        self.server = TransferServer(
            "decode-0", "127.0.0.1:0", KVLayout.from_kv_cache(self.cache, "tiny"), self.cache,
            self._resolve, lambda t, _s: self.events.put(("done", t)),
            lambda t, _e: self.events.put(("error", t)), config,
        )  # fmt: skip

    def _resolve(self, transfer_id: int, num_tokens: int, num_blocks: int) -> list[int]:
        self.resolved.append(transfer_id)
        return [5 + i for i in range(num_blocks)]

    @property
    def refused(self) -> int:
        return self.server.counters.snapshot().refused


@pytest.fixture
def secure_decode() -> Iterator[Decode]:
    decode = Decode(SECURE)
    yield decode
    decode.server.close()


def client(worker_id: str, config: ChannelConfig) -> TransferClient:
    src = cache(1)
    return TransferClient(worker_id, KVLayout.from_kv_cache(src, "tiny"), src, config)


def push_kv(decode: Decode, worker_id: str, config: ChannelConfig, transfer_id: int = 1) -> None:
    """One transfer of 6 tokens from our blocks 0, 1 into the decode side's 5, 6."""
    sender = client(worker_id, config)
    try:
        sender.send_kv("decode-0", decode.server.endpoint, transfer_id, [0, 1], [5, 6], 6)
    finally:
        sender.close()


def landed(decode: Decode) -> bool:
    src = cache(1)
    return torch.equal(decode.cache[5:7], src[0:2])


def test_the_store_listens_only_on_the_given_host(secure_decode: Decode) -> None:
    port = secure_decode.server.endpoint.port
    assert {addr for addr, p in listening() if p == port} == {"127.0.0.1"}


def test_a_pair_with_the_same_token_moves_kv_and_binds_gloo_to_the_host(secure_decode: Decode) -> None:
    before = listening()
    channel = secure_decode.server.open("prefill-ok")
    sender = client("prefill-ok", SECURE)
    try:
        sender.send_kv("decode-0", secure_decode.server.endpoint, 1, [0, 1], [5, 6], 6)
        assert secure_decode.events.get(timeout=60) == ("done", 1)
        gloo = listening() - before  # both ends' gloo listeners live in this process
        assert gloo and all(addr == "127.0.0.1" for addr, _ in gloo), gloo
    finally:
        sender.close()
    channel.join(10)  # the client's close sent a sealed CLOSE, which ends the epoch
    assert isinstance(channel.error, ChannelClosedError) and not channel.running
    assert landed(secure_decode) and secure_decode.refused == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [(BASE, "requires the mesh token"), (dataclasses.replace(BASE, auth_key=OTHER_KEY), "refused our")],
)
def test_a_prefill_without_the_token_is_refused_and_changes_nothing(
    secure_decode: Decode, config: ChannelConfig, message: str
) -> None:
    before = secure_decode.cache.clone()
    channel = secure_decode.server.open("prefill-x")
    with pytest.raises(AuthenticationError, match=message):
        push_kv(secure_decode, "prefill-x", config)
    with pytest.raises(AuthenticationError, match="could not prove the mesh token"):
        channel.wait_ready(10)
    assert channel.state is ChannelState.BROKEN and secure_decode.refused == 1
    assert secure_decode.resolved == [] and torch.equal(secure_decode.cache, before)
    # the decode worker opens a fresh epoch for the next request; a peer with the token gets in
    secure_decode.server.open("prefill-x")
    push_kv(secure_decode, "prefill-x", SECURE, transfer_id=2)
    assert secure_decode.events.get(timeout=60) == ("done", 2) and landed(secure_decode)


def test_a_prefill_with_a_token_refuses_a_decode_side_without_one() -> None:
    decode = Decode(BASE)
    try:
        channel = decode.server.open("prefill-y")
        with pytest.raises(AuthenticationError, match="does not authenticate KV transfers"):
            push_kv(decode, "prefill-y", SECURE)
        channel.join(10)  # its CLOSE ended the epoch at once: no group was ever built
        assert channel.state is ChannelState.BROKEN and not channel.running
        assert decode.resolved == []
    finally:
        decode.server.close()


def _attacker(decode: Decode) -> dist.TCPStore:
    endpoint = decode.server.endpoint
    return dist.TCPStore(endpoint.host, endpoint.port, is_master=False, timeout=timedelta(seconds=10))


def test_a_forged_join_ends_the_epoch_before_any_group(secure_decode: Decode) -> None:
    channel = secure_decode.server.open("prefill-z")
    view = PairKeys("decode-0", "prefill-z").epoch_store(_attacker(secure_decode), channel.epoch)
    assert view.add(CLAIM_KEY, 1) == 1
    view.set(LAYOUT_KEYS[1], KVLayout.from_kv_cache(secure_decode.cache, "tiny").to_json())
    push(view, ControlMessage(Control.JOIN, 0, "00" * 16, "ab" * 32))
    with pytest.raises(AuthenticationError):
        channel.wait_ready(10)
    assert view.get(VERDICT_KEY) == b"refused" and secure_decode.refused == 1


def test_forged_control_messages_are_dropped_and_the_channel_keeps_working(secure_decode: Decode) -> None:
    """Once a real peer joined, nothing written to the store without the session key counts."""
    channel = secure_decode.server.open("prefill-ok")
    sender = client("prefill-ok", SECURE)
    try:
        sender.send_kv("decode-0", secure_decode.server.endpoint, 1, [0, 1], [5, 6], 6)
        assert secure_decode.events.get(timeout=60) == ("done", 1)
        secure_decode.cache[5:7] = 0.0
        before, resolved = secure_decode.cache.clone(), list(secure_decode.resolved)

        view = PairKeys("decode-0", "prefill-ok").epoch_store(_attacker(secure_decode), channel.epoch)
        forged = [
            ControlMessage(Control.SEND, 9, "1,6,2,2,2048;5,2"),  # no tag: the next frame, blocks 5, 6
            ControlMessage(Control.SEND, 9, "1,6,2,2,2048;5,2", "cd" * 32),  # a wrong tag
            ControlMessage(Control.RESET, 0, "00" * 16, "ef" * 32),
            ControlMessage(Control.CLOSE),
        ]
        for msg in forged:
            push(view, msg)
        view.queue_push(CONTROL_KEY, b"not a control message")
        assert wait_until(lambda: secure_decode.refused == len(forged) + 1)
        assert channel.state is ChannelState.READY and secure_decode.events.empty()
        assert secure_decode.resolved == resolved and torch.equal(secure_decode.cache, before)

        sender.send_kv("decode-0", secure_decode.server.endpoint, 2, [0, 1], [5, 6], 6)
        assert secure_decode.events.get(timeout=60) == ("done", 2) and landed(secure_decode)
        assert channel.state is ChannelState.READY and secure_decode.server.channel("prefill-ok") is channel
    finally:
        sender.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds; False at the hang guard."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_signed_store_refuses_values_written_without_the_key() -> None:
    store = dist.HashStore()
    SignedStore(store, KEY).set("0/1", b"address of rank 1")
    assert SignedStore(store, KEY).get("0/1") == b"address of rank 1"
    with pytest.raises(AuthenticationError):
        SignedStore(store, OTHER_KEY).get("0/1")
    store.set("0/0", b"\0" * 32 + b"an attacker's address")
    with pytest.raises(AuthenticationError):
        SignedStore(store, KEY).get("0/0")
    SignedStore(store, KEY).set("0/0", b"x")
    raw = store.get("0/0")
    store.set("0/1", raw)  # a valid value moved to another key
    with pytest.raises(AuthenticationError):
        SignedStore(store, KEY).get("0/1")


def test_the_group_proof_fails_between_different_keys() -> None:
    """A connection that reached a process without the session key is refused on both ends."""
    store = dist.HashStore()
    errors: dict[int, BaseException | None] = {}
    quick = dataclasses.replace(BASE, op_timeout_s=1)  # in one process a dropped peer is seen at the timeout

    def side(rank: int, key: bytes) -> None:
        group = open_pair_group(dist.PrefixStore("pg", store), rank, torch.device("cpu"), quick)
        try:
            PairSession(key).prove_group(group)
            errors[rank] = None
        except Exception as exc:
            errors[rank] = exc
        finally:
            group.abort()

    threads = [
        threading.Thread(target=side, args=(DECODE_RANK, KEY)),
        threading.Thread(target=side, args=(PREFILL_RANK, OTHER_KEY)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(errors[DECODE_RANK], AuthenticationError)
    assert errors[PREFILL_RANK] is not None  # the decode side never answered: its proof failed
