"""KV transfer over a gloo pair channel between this process (decode) and spawned prefill processes."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from scalellm.transfer import (
    ChannelConfig,
    ChannelState,
    KVLayout,
    LayoutMismatchError,
    ProtocolError,
    TransferClient,
    TransferServer,
    TransferStats,
)
from scalellm.transfer.group import PREFILL_RANK, open_pair_group
from scalellm.transfer.rendezvous import (
    CLAIM_KEY,
    GROUP_PREFIX,
    LAYOUT_KEYS,
    Control,
    ControlMessage,
    PairKeys,
    push,
)
from scalellm.transfer.wire import Frame, Segment, plan_segments

pytestmark = pytest.mark.slow  # prefill sides run in processes of their own

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 6, 48, 4, 2, 8
# message_bytes: three blocks of this layout, so that long runs travel as several messages
CONFIG = ChannelConfig(op_timeout_s=5, connect_timeout_s=10, device_host="127.0.0.1", message_bytes=3 * 3072)
Transfer = tuple[
    int, tuple[int, ...], tuple[int, ...], int
]  # transfer id, source / destination blocks, tokens


def make_cache(seed: int, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (BLOCKS, LAYERS, 2, block_size, HEADS, HEAD_DIM)
    return torch.randn(shape, generator=gen).to(dtype)


# ---- the prefill process ---------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    worker_id: str
    decode_id: str
    endpoint: str
    transfers: tuple[Transfer, ...]
    block_size: int = BLOCK_SIZE


@dataclass(frozen=True)
class Close:
    """Close every client and report the transfer threads still alive."""


def _prefill_main(conn, seed: int) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    clients: dict[tuple[str, int], TransferClient] = {}
    while True:
        cmd = conn.recv()
        if isinstance(cmd, Close):
            for client in clients.values():
                client.close()
            conn.send([t.name for t in threading.enumerate() if t.name.startswith("kv-")])
            return
        key = (cmd.worker_id, cmd.block_size)
        if key not in clients:
            cache = make_cache(seed, cmd.block_size)
            clients[key] = TransferClient(cmd.worker_id, KVLayout.from_kv_cache(cache, "tiny"), cache, CONFIG)
        client = clients[key]
        futures = [client.submit_kv(cmd.decode_id, cmd.endpoint, *t) for t in cmd.transfers]
        outcomes = []
        for fut in futures:
            exc = fut.exception()
            outcomes.append(("ok", "") if exc is None else (type(exc).__name__, str(exc)))
        conn.send(outcomes)


@dataclass
class Prefill:
    process: mp.process.BaseProcess
    conn: object
    seed: int

    def send(self, cmd: Send | Close) -> None:
        self.conn.send(cmd)  # type: ignore[attr-defined]

    def reply(self, timeout: float = 30.0) -> list:
        assert self.conn.poll(timeout), "prefill process did not answer"  # type: ignore[attr-defined]
        return self.conn.recv()  # type: ignore[attr-defined]


def spawn_prefill(seed: int) -> Prefill:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_prefill_main, args=(child, seed), daemon=True)
    process.start()
    return Prefill(process, parent, seed)


@pytest.fixture(scope="module")
def prefill() -> Iterator[Prefill]:
    agent = spawn_prefill(seed=1)
    yield agent
    agent.send(Close())
    assert agent.reply() == []
    agent.process.join(10)


# ---- the decode side (this process) ----------------------------------------------------------


@dataclass
class Decode:
    """A TransferServer whose resolver hands out the block ids reserved in ``reserved``."""

    reserved: dict[int, list[int] | None] = field(default_factory=dict)
    events: queue.Queue[tuple[str, int, object]] = field(default_factory=queue.Queue)
    cache: torch.Tensor = field(default_factory=lambda: make_cache(seed=99))
    on_resolve: object = None

    def __post_init__(self) -> None:
        self.server = TransferServer(
            "decode-0", "127.0.0.1:0", KVLayout.from_kv_cache(self.cache, "tiny"), self.cache,
            self.resolve, lambda t, s: self.events.put(("done", t, s)), lambda t, e: self.events.put(("error", t, e)),
            CONFIG,
        )  # fmt: skip

    def resolve(self, transfer_id: int, num_tokens: int, num_blocks: int) -> list[int] | None:
        if callable(self.on_resolve):
            self.on_resolve()
        ids = self.reserved[transfer_id]
        assert ids is None or len(ids) == num_blocks
        return ids

    def next_event(self, timeout: float = 60.0) -> tuple[str, int, object]:  # a hang guard only
        return self.events.get(timeout=timeout)


@pytest.fixture
def decode() -> Iterator[Decode]:
    side = Decode()
    yield side
    side.server.close()


def send(
    prefill: Prefill, decode: Decode, worker: str, transfers: list[Transfer], block_size: int = BLOCK_SIZE
) -> list:
    prefill.send(Send(worker, "decode-0", str(decode.server.endpoint), tuple(transfers), block_size))
    return prefill.reply()


def expect_landed(decode: Decode, before: torch.Tensor, src: torch.Tensor, landed: list[Transfer]) -> None:
    """Exactly the reserved blocks changed, each to its source block (whole blocks travel)."""
    expected = before.clone()
    for _, src_ids, dst_ids, _ in landed:
        for s, d in zip(src_ids, dst_ids, strict=True):
            expected[d] = src[s]
    assert torch.equal(decode.cache, expected)


def reserve(decode: Decode, transfers: list[Transfer]) -> None:
    decode.reserved = {tid: list(dst) for tid, _, dst, _ in transfers}


# ---- tests -----------------------------------------------------------------------------------


def test_layout_diff_names_every_field() -> None:
    ours = KVLayout("m", "float32", 30, 3, 64, 16)
    theirs = KVLayout("m", "bfloat16", 30, 3, 64, 8)
    with pytest.raises(LayoutMismatchError) as err:
        ours.check_compatible(theirs)
    assert [d.name for d in err.value.diffs] == ["dtype", "block_size"]
    assert "dtype: local='float32' peer='bfloat16'" in str(
        err.value
    ) and "block_size: local=16 peer=8" in str(err.value)
    assert KVLayout.from_json(ours.to_json()) == ours
    assert "tensor-parallel" not in str(err.value)
    with pytest.raises(
        LayoutMismatchError, match=r"num_kv_heads: local=3 peer=2 .*another model, not another split"
    ):
        ours.check_compatible(KVLayout("m", "float32", 30, 2, 64, 16))


def test_frame_roundtrip_and_garbage() -> None:
    layout = KVLayout.from_kv_cache(make_cache(0), "tiny")
    frame = Frame.build(3, 9, plan_segments([4, 5, 9], [7, 8, 2]), layout)
    assert frame.runs == ((7, 2), (2, 1)) and frame.payload_bytes == 3 * layout.block_bytes
    decoded = Frame.decode(frame.encode())
    assert decoded == frame and decoded.lays_out([7, 8, 2]) and not decoded.lays_out([7, 8, 3])
    decoded.validate(layout, seq=3, capacity=BLOCKS)
    with pytest.raises(ProtocolError, match="seq 3 != expected 4"):
        decoded.validate(layout, seq=4, capacity=BLOCKS)
    with pytest.raises(ProtocolError, match=r"runs .* do not cover 3 blocks"):
        Frame(3, 9, 3, LAYERS, 3 * layout.block_bytes, ((7, 2),)).validate(layout, seq=3, capacity=BLOCKS)
    for garbage in ("", "1,2", "a,b,c,d,e", "3,9,3,6,1;7"):
        with pytest.raises(ProtocolError, match="malformed"):
            Frame.decode(garbage)


def test_segments_are_runs_consecutive_on_both_sides() -> None:
    assert plan_segments([7, 8, 9, 3, 4, 5], [20, 21, 22, 23, 30, 31]) == [
        Segment(7, 20, 3),
        Segment(3, 23, 1),
        Segment(4, 30, 2),
    ]
    assert plan_segments(list(range(10, 18)), list(range(0, 8))) == [Segment(10, 0, 8)]
    assert plan_segments([5, 4], [1, 2]) == [Segment(5, 1, 1), Segment(4, 2, 1)]  # descending is no run
    assert plan_segments(list(range(10, 15)), list(range(0, 5)), max_count=2) == [
        Segment(10, 0, 2),
        Segment(12, 2, 2),
        Segment(14, 4, 1),
    ]


def test_transfers_land_exactly_in_reserved_blocks_in_fifo_order(prefill: Prefill, decode: Decode) -> None:
    transfers: list[Transfer] = [
        (11, (3,), (47,), 1),
        (12, (7,), (2,), 4),
        (13, (0, 9, 5, 40, 8), (10, 1, 33, 4, 12), 17),  # no run anywhere: five messages
        (-5, (20, 21, 22, 30), (40, 41, 42, 43), 14),  # two runs: (20..22 -> 40..42), (30 -> 43)
        (14, tuple(range(24, 36)), tuple(range(13, 25)), 48),  # one run: one message
    ]
    reserve(decode, transfers)
    before = decode.cache.clone()
    decode.server.open("prefill-a")
    assert send(prefill, decode, "prefill-a", transfers) == [("ok", "")] * len(transfers)
    events = [decode.next_event() for _ in transfers]
    assert [(kind, tid) for kind, tid, _ in events] == [("done", t[0]) for t in transfers]
    stats = events[2][2]
    assert isinstance(stats, TransferStats) and stats.num_tokens == 17 and stats.num_blocks == 5
    expect_landed(decode, before, make_cache(prefill.seed), transfers)
    snap = decode.server.counters.snapshot()
    assert (snap.transfers, snap.failures) == (len(transfers), 0) and snap.bytes > 0


def test_cancelled_transfer_is_drained_and_channel_stays_usable(prefill: Prefill, decode: Decode) -> None:
    transfers: list[Transfer] = [(1, (1, 2), (5, 6), 8), (2, (3, 4, 5), (7, 8, 9), 9), (3, (6,), (7,), 3)]
    reserve(decode, transfers)
    decode.reserved[2] = None
    before = decode.cache.clone()
    decode.server.open("prefill-b")
    assert send(prefill, decode, "prefill-b", transfers) == [("ok", "")] * 3
    assert [decode.next_event()[:2] for _ in range(2)] == [("done", 1), ("done", 3)]
    expect_landed(decode, before, make_cache(prefill.seed), [transfers[0], transfers[2]])
    assert decode.server.counters.snapshot().cancelled == 1


def test_destination_other_than_reserved_is_refused_and_drained(prefill: Prefill, decode: Decode) -> None:
    """A sender told other blocks than the ones reserved must not write anywhere."""
    transfers: list[Transfer] = [(1, (1, 2), (5, 6), 8), (2, (3,), (9,), 2)]
    decode.reserved = {1: [6, 5], 2: [9]}
    before = decode.cache.clone()
    decode.server.open("prefill-w")
    assert send(prefill, decode, "prefill-w", transfers) == [("ok", "")] * 2
    kind, tid, exc = decode.next_event()
    assert (kind, tid) == ("error", 1) and "do not lay out the reserved blocks" in str(exc)
    assert decode.next_event()[:2] == ("done", 2)
    expect_landed(decode, before, make_cache(prefill.seed), [transfers[1]])


def test_layout_mismatch_is_refused_on_both_sides(prefill: Prefill, decode: Decode) -> None:
    channel = decode.server.open("prefill-c")
    [(kind, message)] = send(prefill, decode, "prefill-c", [(1, (0,), (0,), 2)], block_size=8)
    assert kind == "LayoutMismatchError" and "block_size: local=8 decode worker decode-0=4" in message
    with pytest.raises(LayoutMismatchError, match="block_size: local=4 prefill worker prefill-c=8"):
        channel.wait_ready(10)
    assert channel.state is ChannelState.BROKEN


def test_killed_sender_fails_the_transfer_and_a_new_epoch_works(prefill: Prefill, decode: Decode) -> None:
    victim = spawn_prefill(seed=1)

    def kill_victim() -> None:  # called once the header arrived, before any payload
        decode.on_resolve = None
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.join(10)

    decode.on_resolve = kill_victim
    decode.reserved = {1: list(range(12)), 2: [20, 21]}
    first = decode.server.open("prefill-v")
    victim.send(
        Send(
            "prefill-v",
            "decode-0",
            str(decode.server.endpoint),
            ((1, tuple(range(12)), tuple(range(12)), 48),),
        )
    )
    kind, tid, exc = decode.next_event(timeout=120)  # a hang guard only
    assert (kind, tid) == ("error", 1), exc
    # The dead peer was noticed (its connection closed), not waited out (a gloo timeout).
    assert "closed" in str(exc).lower() and "timed out" not in str(exc).lower(), exc
    first.join(5)
    assert first.state is ChannelState.BROKEN and not first.running

    second = decode.server.open("prefill-v")
    assert second.epoch == first.epoch + 1
    before = decode.cache.clone()
    assert send(prefill, decode, "prefill-v", [(2, (1, 2), (20, 21), 5)]) == [("ok", "")]
    assert decode.next_event()[:2] == ("done", 2)
    expect_landed(decode, before, make_cache(prefill.seed), [(2, (1, 2), (20, 21), 5)])


def _open_fds() -> Counter[str]:
    """What this process's file descriptors point at (socket:[inode], pipe:[inode], ...)."""
    targets: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            targets[os.readlink(f"/proc/self/fd/{fd}")] += 1
    return targets


def test_close_releases_threads_sockets_and_port(prefill: Prefill) -> None:
    before: Counter[str] = Counter()
    for cycle in range(2):  # the first cycle may start gloo's process-wide event loop
        if cycle == 1:
            gc.collect()
            before = _open_fds()
        decode = Decode(reserved={1: [3], 2: [4]})
        decode.server.open("prefill-d")
        assert send(prefill, decode, "prefill-d", [(1, (0,), (3,), 1)]) == [("ok", "")]
        assert decode.next_event()[:2] == ("done", 1)
        endpoint = decode.server.endpoint
        decode.server.close()
        assert [t.name for t in threading.enumerate() if t.name.startswith("kv-")] == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((endpoint.host, endpoint.port), timeout=1).close()
        if cycle == 1:
            # What the second cycle opened and did not close: descriptors pointing at something
            # new. Compared by target, not counted, so that other objects of this process closing
            # meanwhile (a loaded machine runs their finalizers late) cannot hide or fake a leak.
            assert not _open_fds() - before
        if cycle == 0:  # the prefill side notices at its next send: a closed peer, not a timeout
            [(kind, message)] = send(prefill, decode, "prefill-d", [(2, (0,), (4,), 1)])
            assert kind == "ChannelBrokenError", message
            assert "closed" in message.lower() and "timed out" not in message.lower(), message


def test_restarted_prefill_process_gets_a_fresh_epoch(decode: Decode) -> None:
    """A new process with the same worker id finds its epoch claimed and asks for a new one."""
    src = make_cache(seed=5)
    layout = KVLayout.from_kv_cache(src, "tiny")
    decode.reserved = {1: [3], 2: [4]}
    first = decode.server.open("prefill-r")
    old, new = (
        TransferClient("prefill-r", layout, src, CONFIG),
        TransferClient("prefill-r", layout, src, CONFIG),
    )
    try:
        old.send_kv("decode-0", decode.server.endpoint, 1, [0], [3], 2)
        assert decode.next_event()[:2] == ("done", 1)
        new.send_kv("decode-0", decode.server.endpoint, 2, [1], [4], 2)  # "old" never closed: it died
        assert decode.next_event()[:2] == ("done", 2)
        assert decode.server.channel("prefill-r").epoch == first.epoch + 1
        assert first.state is ChannelState.BROKEN
    finally:
        old.close()
        new.close()


def test_garbage_frame_breaks_the_channel(decode: Decode) -> None:
    """A peer that joins properly and then announces a bad frame fails that transfer, not the process."""
    channel = decode.server.open("prefill-g")
    endpoint = decode.server.endpoint
    store = torch.distributed.TCPStore(endpoint.host, endpoint.port, is_master=False)
    view = PairKeys("decode-0", "prefill-g").epoch_store(store, channel.epoch)
    assert view.add(CLAIM_KEY, 1) == 1
    view.set(LAYOUT_KEYS[1], KVLayout.from_kv_cache(decode.cache, "tiny").to_json())
    push(view, ControlMessage(Control.JOIN))
    group = open_pair_group(
        torch.distributed.PrefixStore(GROUP_PREFIX, view), PREFILL_RANK, torch.device("cpu"), CONFIG
    )
    push(view, ControlMessage(Control.SEND, 7, "12345,1,1,6,1;0,1"))  # a sequence number out of step
    kind, tid, exc = decode.next_event()
    assert (kind, tid) == ("error", 7) and isinstance(exc, ProtocolError), exc
    channel.join(5)
    assert channel.state is ChannelState.BROKEN and not channel.running
    group.abort()
