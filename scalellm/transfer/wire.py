"""What travels for one transfer: a frame on the control queue, then the payload as block runs.

The engine cache is block-major, ``[num_blocks, num_layers, 2, block_size, heads, head_dim]``:
block ``b`` is one contiguous span holding every layer's K and V of its tokens, and blocks
``b .. b+n-1`` are one contiguous slice. A transfer moves source block ``src[i]`` into destination
block ``dst[i]``. It is cut into *segments*, maximal runs where both the source and the destination
ids are consecutive, and each segment travels as one message on the pair group, straight out of
the sender's cache and straight into the receiver's (no gather, no scatter, no staging buffer)::

    src  [ 7  8  9 |  3 |  4  5 ]     segments (src, dst, count): (7, 20, 3) (3, 23, 1) (4, 30, 2)
    dst  [20 21 22 | 23 | 30 31 ]     9 -> 3 breaks the source run, 23 -> 30 the destination run

The :class:`Frame` (sequence number, sizes, and the destination runs ``(dst, count)`` in wire
order) rides in the ``SEND`` control message that announces the transfer, so the receiver can post
every payload receive at once; nothing but KV goes over the process group. Encoded as text::

    seq,num_tokens,num_blocks,num_layers,payload_bytes;dst,count;dst,count...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scalellm.transfer.errors import ProtocolError
from scalellm.transfer.layout import KVLayout


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive blocks from ``src`` (sender's ids) to ``dst`` (receiver's ids)."""

    src: int
    dst: int
    count: int


def plan_segments(
    src_ids: Sequence[int], dst_ids: Sequence[int], max_count: int | None = None
) -> list[Segment]:
    """Cut a block mapping into maximal runs consecutive on both sides, each at most ``max_count``
    blocks long (None: no limit)."""
    segments: list[Segment] = []
    limit = max_count or len(src_ids)
    for src, dst in zip(src_ids, dst_ids, strict=True):
        last = segments[-1] if segments else None
        if (
            last is not None
            and last.count < limit
            and src == last.src + last.count
            and dst == last.dst + last.count
        ):
            segments[-1] = Segment(last.src, last.dst, last.count + 1)
        else:
            segments.append(Segment(src, dst, 1))
    return segments


def check_block_ids(ids: Sequence[int], num_tokens: int, block_size: int, capacity: int) -> None:
    """One id per started block, distinct, in ``[0, capacity)``; ``ValueError`` if not."""
    if num_tokens < 1 or len(ids) != -(-num_tokens // block_size):
        raise ValueError(
            f"{len(ids)} block ids cannot hold exactly {num_tokens} tokens of block size {block_size}"
        )
    if len(set(ids)) != len(ids) or not all(0 <= b < capacity for b in ids):
        raise ValueError(f"block ids must be distinct and in [0, {capacity}): {list(ids)}")


@dataclass(frozen=True)
class Frame:
    """Everything the receiver needs before the payload: announced with the transfer."""

    seq: int
    num_tokens: int
    num_blocks: int
    num_layers: int
    payload_bytes: int
    runs: tuple[tuple[int, int], ...]
    """``(dst_start, count)`` of each payload message, in wire order."""

    @classmethod
    def build(cls, seq: int, num_tokens: int, segments: Sequence[Segment], layout: KVLayout) -> Frame:
        num_blocks = sum(s.count for s in segments)
        runs = tuple((s.dst, s.count) for s in segments)
        return cls(seq, num_tokens, num_blocks, layout.num_layers, num_blocks * layout.block_bytes, runs)

    def encode(self) -> str:
        sizes = f"{self.seq},{self.num_tokens},{self.num_blocks},{self.num_layers},{self.payload_bytes}"
        return ";".join([sizes, *(f"{dst},{count}" for dst, count in self.runs)])

    @classmethod
    def decode(cls, text: str) -> Frame:
        """Parse a frame; anything malformed is a :class:`ProtocolError`."""
        try:
            sizes, *runs = text.split(";")
            seq, num_tokens, num_blocks, num_layers, payload = (int(v) for v in sizes.split(","))
            pairs = tuple((int(dst), int(count)) for dst, count in (r.split(",") for r in runs))
        except ValueError as exc:
            raise ProtocolError(f"malformed transfer frame {text!r}: the stream is out of sync") from exc
        return cls(seq, num_tokens, num_blocks, num_layers, payload, pairs)

    def validate(self, layout: KVLayout, seq: int, capacity: int) -> None:
        """Check the frame against the channel state and our cache (``capacity`` blocks)."""
        blocks = -(-self.num_tokens // layout.block_size)
        expected_bytes = self.num_blocks * layout.block_bytes
        counts = [count for _, count in self.runs]
        checks = [
            (self.seq == seq, f"seq {self.seq} != expected {seq}"),
            (self.num_tokens >= 1, f"num_tokens {self.num_tokens} < 1"),
            (
                self.num_blocks == blocks,
                f"num_blocks {self.num_blocks} != ceil(tokens / block_size) = {blocks}",
            ),
            (self.num_blocks <= capacity, f"num_blocks {self.num_blocks} > cache capacity {capacity}"),
            (self.num_layers == layout.num_layers, f"num_layers {self.num_layers} != {layout.num_layers}"),
            (self.payload_bytes == expected_bytes, f"payload_bytes {self.payload_bytes} != {expected_bytes}"),
            (
                bool(counts) and min(counts) >= 1 and sum(counts) == self.num_blocks,
                f"runs {list(self.runs)} do not cover {self.num_blocks} blocks",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ProtocolError("invalid transfer frame: " + "; ".join(problems))

    def lays_out(self, dst_ids: Sequence[int]) -> bool:
        """Whether the runs cover exactly ``dst_ids``, in order."""
        expanded = [dst + i for dst, count in self.runs for i in range(count)]
        return expanded == list(dst_ids)


class BufferPool:
    """Reusable wire buffers of one channel end, used by one thread at a time.

    Only two cases need them: staging when the transport's device differs from the cache's (gloo
    with a CUDA cache: pinned CPU buffers), and draining the payload of a transfer that has no
    destination (cancelled). Fresh multi-megabyte CPU tensors page-fault on first touch, so the
    largest buffer is kept for the next transfer.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def get(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised buffer with ``like``'s shape and dtype."""
        nbytes = like.numel() * like.element_size()
        if self._buffer.numel() < nbytes:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
        return self._buffer[:nbytes].view(like.dtype).view(like.shape)

    @property
    def nbytes(self) -> int:
        return self._buffer.numel()
