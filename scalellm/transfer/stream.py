"""The data path of one transfer: one message per segment, posted together.

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
from scalellm.transfer.wire import BufferPool, Segment

WINDOW: Final[int] = 32
"""Most payload messages posted at once per side."""


def send_payload(
    group: PairGroup, segments: Sequence[Segment], kv_cache: torch.Tensor, pool: BufferPool
) -> None:
    """Put the segments on the wire; returns once every byte was handed to the transport."""
    works: deque[dist.Work] = deque()
    staged = group.wire_device != kv_cache.device
    for seg in segments:
        span = kv_cache[seg.src : seg.src + seg.count]
        if staged:
            _drain(group, works, 0)  # one staging buffer: the previous segment must be out
            span = pool.get(span).copy_(span)
        works.append(group.send(span))
        _drain(group, works, WINDOW)
    _drain(group, works, 0)


def recv_payload(
    group: PairGroup, runs: Sequence[tuple[int, int]], kv_cache: torch.Tensor, pool: BufferPool, land: bool
) -> None:
    """Receive one message per run into ``kv_cache[dst:dst + count]``, or drain it when not ``land``."""
    staged = group.wire_device != kv_cache.device
    works: deque[dist.Work] = deque()
    for dst, count in runs:
        if not land or staged:
            _drain(group, works, 0)  # one pool buffer: the previous message must be in
            like = kv_cache[:count]  # shape and dtype only: a drained run may lie outside the cache
            buffer = pool.get(like)
            group.wait(group.recv(buffer))
            if land:
                kv_cache[dst : dst + count].copy_(buffer)
            continue
        works.append(group.recv(kv_cache[dst : dst + count]))
        _drain(group, works, WINDOW)
    _drain(group, works, 0)
    if land and kv_cache.is_cuda:
        torch.cuda.current_stream(kv_cache.device).synchronize()


def _drain(group: PairGroup, works: deque[dist.Work], keep: int) -> None:
    """Wait for the oldest posted messages until at most ``keep`` remain."""
    while len(works) > keep:
        group.wait(works.popleft())
