"""Host memory in 2 MB pages for what a CPU step streams: the weights and the KV cache.

A decode step reads every weight once and each request's K/V blocks once; on CPU both are far
larger than the TLB covers in 4 KB pages (the L2 TLB of a Zen 4 core: 3072 entries, 12 MB), so a
step walks the page tables thousands of times. Linux gives anonymous memory 2 MB pages
(transparent huge pages) where the process asks for them with ``madvise(MADV_HUGEPAGE)`` before
the pages are first touched, which is the default setting of most distributions
(``/sys/kernel/mm/transparent_hugepage/enabled``: ``[madvise]``). On a 2-core Zen 4 VM the panel
kernel streamed a 135M model's weights 9-19% faster from such pages, the paged decode kernel
read K/V 2-14% faster (docs/benchmarks.md, "Long prompts; prefill tiles without reloads;
weights and KV cache in 2 MB pages").

``empty`` allocates a tensor whose pages are advised before anything touches them;
``move_module`` copies a model's tensors into such arenas after loading, a group of up to
``ARENA_BYTES`` at a time so that loading never holds much more than one copy of the weights
(groups under 2 MB, a tiny model's, stay where they are).
Where the kernel has no transparent huge pages (``never``, or not Linux) both leave memory as it
is. Whether the kernel then hands out 2 MB pages depends on the free memory it can compact; the
tensors' values are the same either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
from functools import cache
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
ARENA_BYTES = 256 << 20
"""The most bytes of tensors copied into one arena (the extra memory held while moving)."""
MIN_TENSOR_BYTES = 64 << 10
"""Smaller tensors (norm weights, biases, scales) stay where they are: they stay in cache."""
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's madvise where advising can give 2 MB pages, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return None
    if "[never]" in setting:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process can ask for 2 MB pages."""
    return _madvise() is not None


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, its whole 2 MB pages advised as huge before
    first use (nothing has touched them: torch.empty does not write)."""
    nbytes = math.prod(shape) * dtype.itemsize
    advise = _madvise()
    if advise is None or nbytes < HUGE_PAGE:
        return torch.empty(tuple(shape), dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # room to start on a 2 MB boundary
    skip = -raw.data_ptr() % HUGE_PAGE
    pages = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if advise(raw.data_ptr() + skip, min(pages, raw.numel() - skip), MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
    # the uint8 storage's view as the caller's tensor (its offset is a multiple of 2 MB)
    return raw[skip : skip + nbytes].view(dtype).view(tuple(shape))


def zeros(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """``empty``, zeroed: the zeroing is the pages' first touch."""
    return empty(shape, dtype).zero_()


def _movable(tensor: object) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and tensor.nbytes >= MIN_TENSOR_BYTES
    )


def move_module(model: nn.Module) -> int:
    """Copy the model's large CPU tensors (parameters, buffers and plain tensor attributes, such
    as packed weights) into arenas of advised pages and point the modules at the copies; return
    the bytes moved. A parameter keeps its object (its ``.data`` is replaced), so whatever holds
    it sees the copy; a tensor reached from several modules is copied once. A storage shared by
    different tensors (views of one another) is left where it is: copying each would untie them.
    Call before anything keeps references to the tensors (CpuDecodeStack takes its own)."""
    if _madvise() is None:
        return 0
    places: dict[int, list[tuple[nn.Module, str]]] = {}  # tensor id -> where modules hold it
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        held = {**module.__dict__, **module._parameters, **module._buffers}
        for name, value in held.items():
            if _movable(value):
                assert isinstance(value, torch.Tensor)
                tensors.setdefault(id(value), value)
                places.setdefault(id(value), []).append((module, name))
    owners: dict[int, int] = {}  # storage address -> tensors on it
    for tensor in tensors.values():
        key = tensor.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    order = [k for k, t in tensors.items() if owners[t.untyped_storage().data_ptr()] == 1]
    groups: list[list[int]] = [[]]
    group_bytes = 0
    for key in order:
        size = _padded(tensors[key])
        if groups[-1] and group_bytes + size > ARENA_BYTES:
            groups.append([])
            group_bytes = 0
        groups[-1].append(key)
        group_bytes += size
    moved = 0
    for group in groups:
        if sum(_padded(tensors[k]) for k in group) >= HUGE_PAGE:  # else no 2 MB page: left as it is
            moved += _move_group([tensors[k] for k in group], [places[k] for k in group])
    return moved


def _padded(tensor: torch.Tensor) -> int:
    """A tensor's bytes in an arena: each starts on a 64-byte line."""
    return (tensor.nbytes + 63) // 64 * 64


def _move_group(tensors: list[torch.Tensor], places: list[list[tuple[nn.Module, str]]]) -> int:
    arena = empty((sum(_padded(t) for t in tensors),), torch.uint8)
    offset = 0
    for tensor, where in zip(tensors, places, strict=True):
        copy = arena[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        with torch.no_grad():
            copy.copy_(tensor)
        offset += _padded(tensor)
        for module, name in where:
            if name in module._parameters:
                param = module._parameters[name]
                assert param is not None
                param.data = copy
            elif name in module._buffers:
                module._buffers[name] = copy
            else:
                object.__setattr__(module, name, copy)
    return offset
