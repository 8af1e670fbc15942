"""The data path of one transfer: header, segment table, then one message per segment.

Zero-copy when the transport works on the cache's own device (gloo with a CPU cache, NCCL with a
CUDA cache): a segment is the slice ``kv_cache[start:start + count]`` of the block-major cache, sent
from and received into as is, with up to ``WINDOW`` messages posted at once. Gloo with a CUDA
cache stages each segment through a pinned CPU buffer, one at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

import torch
import torch.distributed as dist

from scalellm.transfer.group import PairGroup
from scalellm.transfer.wire import (
    HEADER_WORDS,
    BufferPool,
    Header,
    Segment,
    table_from_tensor,
    table_to_tensor,
)

WINDOW: Final[int] = 32
"""Most payload messages posted at once per side."""


def send_transfer(
    group: PairGroup, header: Header, segments: Sequence[Segment], kv_cache: torch.Tensor, pool: BufferPool
) -> None:
    """Put one transfer on the wire; returns once every byte was handed to the transport."""
    works = deque([group.send(header.to_tensor(group.wire_device))])
    works.append(group.send(table_to_tensor(segments, group.wire_device)))
    staged = group.wire_device != kv_cache.device
    for seg in segments:
        span = kv_cache[seg.src : seg.src + seg.count]
        if staged:
            _drain(group, works, 0)  # one staging buffer: the previous segment must be out
            span = pool.get(span).copy_(span)
        works.append(group.send(span))
        _drain(group, works, WINDOW)
    _drain(group, works, 0)


def recv_header(group: PairGroup) -> Header:
    """Receive the next frame's header (validated for magic and version only)."""
    raw = torch.empty(HEADER_WORDS, dtype=torch.int64, device=group.wire_device)
    group.wait(group.recv(raw))
    return Header.from_tensor(raw)


def recv_table(group: PairGroup, header: Header) -> list[tuple[int, int]]:
    """Receive the segment table that follows ``header``: ``(dst_start, count)`` pairs."""
    raw = torch.empty(header.num_segments, 2, dtype=torch.int64, device=group.wire_device)
    group.wait(group.recv(raw))
    return table_from_tensor(raw, header.num_blocks)


def recv_payload(
    group: PairGroup, runs: Sequence[tuple[int, int]], kv_cache: torch.Tensor, pool: BufferPool, land: bool
) -> None:
    """Receive one message per run into ``kv_cache[dst:dst + count]``, or drain it when not ``land``."""
    staged = group.wire_device != kv_cache.device
    works: deque[dist.Work] = deque()
    for dst, count in runs:
        span = kv_cache[dst : dst + count]
        if not land or staged:
            _drain(group, works, 0)  # one pool buffer: the previous message must be in
            buffer = pool.get(span)
            group.wait(group.recv(buffer))
            if land:
                span.copy_(buffer)
            continue
        works.append(group.recv(span))
        _drain(group, works, WINDOW)
    _drain(group, works, 0)
    if land and kv_cache.is_cuda:
        torch.cuda.current_stream(kv_cache.device).synchronize()


def _drain(group: PairGroup, works: deque[dist.Work], keep: int) -> None:
    """Wait for the oldest posted messages until at most ``keep`` remain."""
    while len(works) > keep:
        group.wait(works.popleft())
