"""Frame format: a fixed int64 header, a segment table, then the payload as contiguous block runs.

The engine cache is block-major, ``[num_blocks, num_layers, 2, block_size, heads, head_dim]``:
block ``b`` is one contiguous span holding every layer's K and V of its tokens, and blocks
``b .. b+n-1`` are one contiguous slice. A transfer moves source block ``src[i]`` into destination
block ``dst[i]``. It is cut into *segments*, maximal runs where both the source and the destination
ids are consecutive, and each segment travels as one message, straight out of the sender's cache
and straight into the receiver's (no gather, no scatter, no staging buffer)::

    src  [ 7  8  9 |  3 |  4  5 ]     segments (src, dst, count): (7, 20, 3) (3, 23, 1) (4, 30, 2)
    dst  [20 21 22 | 23 | 30 31 ]     9 -> 3 breaks the source run, 23 -> 30 the destination run

Header (``HEADER_WORDS`` int64 words, one message)::

    0 MAGIC            5 num_blocks
    1 PROTOCOL_VERSION 6 num_layers
    2 seq              7 num_segments
    3 transfer_id      8 payload_bytes
    4 num_tokens       9..15 reserved (0)

Segment table (one message): int64 ``[num_segments, 2]`` of ``(dst_start, count)``, in wire order.
The receiver checks it against the destination blocks it reserved before any payload lands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch

from scalellm.transfer.errors import ProtocolError
from scalellm.transfer.layout import PROTOCOL_VERSION, KVLayout

MAGIC: Final[int] = 0x534C_4B56_5846_5232  # "SLKVXFR2"
HEADER_WORDS: Final[int] = 16
HEADER_BYTES: Final[int] = HEADER_WORDS * 8


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive blocks from ``src`` (sender's ids) to ``dst`` (receiver's ids)."""

    src: int
    dst: int
    count: int


def plan_segments(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Segment]:
    """Cut a block mapping into maximal runs consecutive on both sides."""
    segments: list[Segment] = []
    for src, dst in zip(src_ids, dst_ids, strict=True):
        last = segments[-1] if segments else None
        if last is not None and src == last.src + last.count and dst == last.dst + last.count:
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
class Header:
    """The fixed-size header that opens every transfer."""

    seq: int
    transfer_id: int
    num_tokens: int
    num_blocks: int
    num_layers: int
    num_segments: int
    payload_bytes: int

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        words = [MAGIC, PROTOCOL_VERSION, self.seq, self.transfer_id, self.num_tokens, self.num_blocks]
        words += [self.num_layers, self.num_segments, self.payload_bytes]
        words += [0] * (HEADER_WORDS - len(words))
        return torch.tensor(words, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        """Decode a received header; wrong magic or version is a :class:`ProtocolError`."""
        words = tensor.cpu().tolist()
        if words[0] != MAGIC:
            raise ProtocolError(f"bad frame magic {words[0]:#x}: the stream is out of sync")
        if words[1] != PROTOCOL_VERSION:
            raise ProtocolError(f"peer speaks protocol {words[1]}, we speak {PROTOCOL_VERSION}")
        return cls(*words[2:9])

    def validate(self, layout: KVLayout, seq: int, transfer_id: int, capacity: int) -> None:
        """Check the header against the channel state and our cache (``capacity`` blocks)."""
        blocks = -(-self.num_tokens // layout.block_size)
        expected_bytes = self.num_blocks * layout.block_bytes
        checks = [
            (self.seq == seq, f"seq {self.seq} != expected {seq}"),
            (self.transfer_id == transfer_id, f"transfer id {self.transfer_id} != announced {transfer_id}"),
            (self.num_tokens >= 1, f"num_tokens {self.num_tokens} < 1"),
            (
                self.num_blocks == blocks,
                f"num_blocks {self.num_blocks} != ceil(tokens / block_size) = {blocks}",
            ),
            (self.num_blocks <= capacity, f"num_blocks {self.num_blocks} > cache capacity {capacity}"),
            (self.num_layers == layout.num_layers, f"num_layers {self.num_layers} != {layout.num_layers}"),
            (
                1 <= self.num_segments <= self.num_blocks,
                f"num_segments {self.num_segments} not in [1, {self.num_blocks}]",
            ),
            (self.payload_bytes == expected_bytes, f"payload_bytes {self.payload_bytes} != {expected_bytes}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ProtocolError("invalid transfer header: " + "; ".join(problems))


def wire_bytes(header: Header) -> int:
    """Bytes of the whole frame: header, segment table and payload."""
    return HEADER_BYTES + 16 * header.num_segments + header.payload_bytes


def table_to_tensor(segments: Sequence[Segment], device: torch.device) -> torch.Tensor:
    return torch.tensor([[s.dst, s.count] for s in segments], dtype=torch.int64, device=device)


def table_from_tensor(table: torch.Tensor, num_blocks: int) -> list[tuple[int, int]]:
    """``(dst_start, count)`` pairs; counts that do not add up to ``num_blocks`` are a ProtocolError."""
    runs = [(int(dst), int(count)) for dst, count in table.cpu().tolist()]
    if any(count < 1 for _, count in runs) or sum(count for _, count in runs) != num_blocks:
        raise ProtocolError(f"segment table {runs} does not cover {num_blocks} blocks")
    return runs


def runs_match(runs: Sequence[tuple[int, int]], dst_ids: Sequence[int]) -> bool:
    """Whether the announced runs lay out exactly ``dst_ids``, in order."""
    expanded = [dst + i for dst, count in runs for i in range(count)]
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
