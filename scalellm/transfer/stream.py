"""The data path of one transfer: header, then layer groups pipelined on the wire.

The sender gathers group i+1 while group i is in flight; the receiver keeps ``inflight`` receives
posted and scatters group i while later groups arrive. Each end sizes its own buffer depth
(``ChannelConfig.inflight_bytes``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scalellm.transfer.config import ChannelConfig
from scalellm.transfer.group import PairGroup
from scalellm.transfer.layout import KVLayout
from scalellm.transfer.wire import HEADER_WORDS, Blocks, BufferPool, Header, gather, inflight_groups, scatter


def send_transfer(
    group: PairGroup, header: Header, layout: KVLayout, kv_cache: torch.Tensor, blocks: Blocks, pool: BufferPool,
    config: ChannelConfig,
) -> None:  # fmt: skip
    """Put one transfer on the wire; returns once every byte was handed to the transport."""
    header_work = group.send(header.to_tensor(group.wire_device))
    spans = header.groups
    buffers = _buffers(pool, layout, header, config)
    pending: list[dist.Work | None] = [None] * len(buffers)
    for i, (l0, l1) in enumerate(spans):
        slot = i % len(buffers)
        if (work := pending[slot]) is not None:
            group.wait(work)
        out = buffers[slot][: l1 - l0]
        gather(kv_cache, l0, l1, blocks, out)
        pending[slot] = group.send(out)
    group.wait(header_work)
    for work in pending:
        if work is not None:
            group.wait(work)


def recv_header(group: PairGroup) -> Header:
    """Receive the next frame's header (validated for magic and version only)."""
    raw = torch.empty(HEADER_WORDS, dtype=torch.int64, device=group.wire_device)
    group.wait(group.recv(raw))
    return Header.from_tensor(raw)


def recv_payload(
    group: PairGroup, header: Header, layout: KVLayout, kv_cache: torch.Tensor, blocks: Blocks | None,
    pool: BufferPool, config: ChannelConfig,
) -> None:  # fmt: skip
    """Receive the payload of ``header``; land it in ``blocks``, or discard it when None."""
    spans = header.groups
    buffers = _buffers(pool, layout, header, config)
    posted: dict[int, dist.Work] = {}

    def post(i: int) -> None:
        l0, l1 = spans[i]
        posted[i] = group.recv(buffers[i % len(buffers)][: l1 - l0])

    for i in range(len(buffers)):
        post(i)
    for i, (l0, l1) in enumerate(spans):
        group.wait(posted.pop(i))
        if blocks is not None:
            scatter(kv_cache, l0, l1, blocks, buffers[i % len(buffers)][: l1 - l0])
        if i + len(buffers) < len(spans):
            post(i + len(buffers))
    if kv_cache.is_cuda:
        torch.cuda.current_stream(kv_cache.device).synchronize()


def _buffers(pool: BufferPool, layout: KVLayout, header: Header, config: ChannelConfig) -> list[torch.Tensor]:
    count = min(inflight_groups(header, layout, config), len(header.groups))
    return [pool.get(slot, layout, header.layers_per_group, header.num_blocks) for slot in range(count)]
