"""Frame format: a fixed int64 header, then the payload in layer groups.

Header (``HEADER_WORDS`` little int64 words, sent as one tensor)::

    0 MAGIC            5 num_blocks
    1 PROTOCOL_VERSION 6 num_layers
    2 seq              7 layers_per_group
    3 transfer_id      8 payload_bytes
    4 num_tokens       9..15 reserved (0)

Layer group ``i`` covers layers ``[i*g, min((i+1)*g, L))`` and is the contiguous tensor
``kv_cache[l0:l1, :, block_ids]`` of shape ``[l1-l0, 2, num_blocks, block_size, heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch

from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.errors import ProtocolError
from scalellm.transfer.layout import PROTOCOL_VERSION, KVLayout

MAGIC: Final[int] = 0x534C_4B56_5846_5231  # "SLKVXFR1"
HEADER_WORDS: Final[int] = 16
HEADER_BYTES: Final[int] = HEADER_WORDS * 8


@dataclass(frozen=True)
class Header:
    """The fixed-size header that opens every transfer."""

    seq: int
    transfer_id: int
    num_tokens: int
    num_blocks: int
    num_layers: int
    layers_per_group: int
    payload_bytes: int

    @property
    def groups(self) -> list[tuple[int, int]]:
        """``(first, end)`` layer ranges of the payload messages, in wire order."""
        step = self.layers_per_group
        return [(l0, min(l0 + step, self.num_layers)) for l0 in range(0, self.num_layers, step)]

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        words = [MAGIC, PROTOCOL_VERSION, self.seq, self.transfer_id, self.num_tokens, self.num_blocks]
        words += [self.num_layers, self.layers_per_group, self.payload_bytes]
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
        expected_bytes = payload_bytes(layout, self.num_blocks)
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
            (1 <= self.layers_per_group <= layout.num_layers, f"layers_per_group {self.layers_per_group}"),
            (self.payload_bytes == expected_bytes, f"payload_bytes {self.payload_bytes} != {expected_bytes}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ProtocolError("invalid transfer header: " + "; ".join(problems))


def payload_bytes(layout: KVLayout, num_blocks: int) -> int:
    return layout.num_layers * num_blocks * layout.block_bytes_per_layer


def choose_layers_per_group(layout: KVLayout, num_blocks: int, config: ChannelConfig) -> int:
    """Layers per payload message: fixed by config, else about ``group_target_bytes`` each.

    Every message costs a gloo/NCCL handshake, so small payloads go in one or two messages and
    large ones in at most ``max_groups``, enough to overlap gather and scatter with the wire.
    """
    if config.layers_per_group is not None:
        return min(config.layers_per_group, layout.num_layers)
    groups = payload_bytes(layout, num_blocks) // config.group_target_bytes
    groups = max(1, min(groups, config.max_groups, layout.num_layers))
    return -(-layout.num_layers // groups)


def inflight_groups(header: Header, layout: KVLayout, config: ChannelConfig) -> int:
    """Groups on the wire at once: as many as ``inflight_bytes`` holds, at least two."""
    group = header.layers_per_group * header.num_blocks * layout.block_bytes_per_layer
    return max(2, min(len(header.groups), config.inflight_bytes // max(group, 1)))


class BufferPool:
    """Reusable wire buffers of one channel end, used by one thread at a time.

    Fresh multi-megabyte CPU tensors page-fault on first touch, which costs about as much as
    moving them over loopback, so each slot keeps its largest buffer for the next transfer.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._slots: list[torch.Tensor] = []

    def get(self, slot: int, layout: KVLayout, layers: int, num_blocks: int) -> torch.Tensor:
        """Slot ``slot``'s buffer viewed as one layer group (uninitialised)."""
        nbytes = layers * num_blocks * layout.block_bytes_per_layer
        while len(self._slots) <= slot:
            self._slots.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._slots[slot].numel() < nbytes:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
            self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
        shape = (layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        return self._slots[slot][:nbytes].view(layout.torch_dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._slots)


@dataclass(frozen=True)
class Blocks:
    """A sequence's block table checked against one cache: where its ``num_tokens`` slots live."""

    ids: tuple[int, ...]
    index: torch.Tensor
    num_tokens: int

    @classmethod
    def build(cls, block_ids: list[int] | tuple[int, ...], num_tokens: int, kv_cache: torch.Tensor) -> Blocks:
        """Validate ``block_ids`` (one per started block, distinct, in range); ``ValueError`` if not."""
        ids = tuple(int(b) for b in block_ids)
        block_size, capacity = kv_cache.shape[3], kv_cache.shape[2]
        if num_tokens < 1 or len(ids) != -(-num_tokens // block_size):
            raise ValueError(
                f"{len(ids)} block ids cannot hold exactly {num_tokens} tokens of block size {block_size}"
            )
        if len(set(ids)) != len(ids) or not all(0 <= b < capacity for b in ids):
            raise ValueError(f"block ids must be distinct and in [0, {capacity}): {list(ids)}")
        return cls(ids, torch.tensor(ids, dtype=torch.int64, device=kv_cache.device), num_tokens)


def gather(kv_cache: torch.Tensor, l0: int, l1: int, blocks: Blocks, out: torch.Tensor) -> None:
    """Copy ``kv_cache[l0:l1, :, blocks]`` into ``out`` (which may live on another device)."""
    if out.device == kv_cache.device:
        torch.index_select(kv_cache[l0:l1], 2, blocks.index, out=out)
    else:
        out.copy_(kv_cache[l0:l1].index_select(2, blocks.index))


def scatter(kv_cache: torch.Tensor, l0: int, l1: int, blocks: Blocks, src: torch.Tensor) -> None:
    """Write a received group into ``blocks``: only their first ``num_tokens`` slots change."""
    src = src.to(kv_cache.device)  # blocking: a staging buffer is reused right after
    full, rest = divmod(blocks.num_tokens, kv_cache.shape[3])
    if full:
        kv_cache[l0:l1].index_copy_(2, blocks.index[:full], src[:, :, :full])
    if rest:
        kv_cache[l0:l1, :, blocks.ids[full], :rest].copy_(src[:, :, full, :rest])
