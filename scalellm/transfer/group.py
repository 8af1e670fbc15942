"""A directly constructed two-rank process group (no ``init_process_group``, no world size).

Rank 0 is the decode worker, rank 1 the prefill worker. Gloo and NCCL share this code path; only
the constructor differs. Gloo carries CPU tensors only, so a CUDA cache on gloo stages through CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from scalellm.transfer.config import ChannelConfig, Transport
from scalellm.transfer.errors import ChannelBrokenError, TransferError

log = logging.getLogger(__name__)

DECODE_RANK = 0
PREFILL_RANK = 1


class PairBackend(Protocol):
    """What a pair uses of ProcessGroupGloo / ProcessGroupNCCL (torch's stubs declare neither
    send/recv on those classes nor gloo's _Options: the constructors below are typed Any)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work: ...

    def abort(self) -> None: ...

    def shutdown(self) -> None: ...


@dataclass
class PairGroup:
    """One pair's backend with timed point-to-point operations."""

    backend: PairBackend
    transport: Transport
    rank: int
    wire_device: torch.device
    op_timeout: timedelta

    @property
    def peer(self) -> int:
        return 1 - self.rank

    def send(self, tensor: torch.Tensor) -> dist.Work:
        """Start sending ``tensor`` (contiguous, on ``wire_device``) to the peer."""
        return self._start(self.backend.send, tensor)

    def recv(self, tensor: torch.Tensor) -> dist.Work:
        """Start receiving the peer's next message into ``tensor``."""
        return self._start(self.backend.recv, tensor)

    def _start(
        self, op: Callable[[list[torch.Tensor], int, int], dist.Work], tensor: torch.Tensor
    ) -> dist.Work:
        try:
            return op([tensor], self.peer, 0)
        except RuntimeError as exc:
            raise ChannelBrokenError(f"{self.transport.value} {op.__name__} failed: {exc}") from exc

    def wait(self, work: dist.Work) -> None:
        """Wait for ``work`` at most ``op_timeout``; a timeout or peer failure breaks the channel."""
        try:
            work.wait(self.op_timeout)
        except RuntimeError as exc:
            raise ChannelBrokenError(f"{self.transport.value} transfer failed: {exc}") from exc

    def abort(self) -> None:
        """Drop the connections so the peer fails fast (a local wait still runs to its timeout)."""
        for step in (self.backend.abort, self.backend.shutdown):
            try:
                step()
            except RuntimeError as exc:  # already torn down, or unsupported by the backend
                log.debug("pair group %s: %s", step.__name__, exc)


def open_pair_group(
    store: dist.Store, rank: int, kv_device: torch.device, config: ChannelConfig
) -> PairGroup:
    """Build the pair's backend on ``store`` (already prefixed per pair and epoch).

    Blocks until the peer constructs its side, at most ``config.connect_timeout``.
    """
    transport = config.transport_for(kv_device)
    try:
        if transport is Transport.NCCL:
            backend = _nccl(store, rank, kv_device, config)
            wire = kv_device
        else:
            backend = _gloo(store, rank, config)
            wire = torch.device("cpu")
    except TransferError:  # e.g. a signed rendezvous key someone else wrote (AuthenticationError)
        raise
    except RuntimeError as exc:  # DistStoreError on rendezvous timeout, gloo connect errors
        raise ChannelBrokenError(f"{transport.value} pair group rendezvous failed: {exc}") from exc
    return PairGroup(backend, transport, rank, wire, config.op_timeout)


def _gloo(store: dist.Store, rank: int, config: ChannelConfig) -> PairBackend:
    gloo: Any = dist.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = config.connect_timeout
    options._threads = 1  # point-to-point runs on the caller's thread; collectives are unused
    if config.device_host:
        options._devices = [gloo.create_device(hostname=config.device_host)]
    else:
        options._devices = [gloo.create_default_device()]
    backend = gloo(store, rank, 2, options)
    backend._set_default_timeout(config.op_timeout)
    return backend


def _nccl(store: dist.Store, rank: int, device: torch.device, config: ChannelConfig) -> PairBackend:
    # NCCL's watchdog tears the whole process down on a timed-out op by default (mode 3). A pair
    # channel must only abort its communicator, so ask for mode 2 unless the operator chose.
    # ProcessGroupNCCL reads this variable in its constructor.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    nccl: Any = dist.ProcessGroupNCCL
    options = nccl.Options()
    options._timeout = config.op_timeout
    options.is_high_priority_stream = False
    torch.cuda.set_device(device)
    return nccl(store, rank, 2, options)
