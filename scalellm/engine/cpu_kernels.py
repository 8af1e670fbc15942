"""CPU kernels of our own, built once per machine with the C++ compiler torch uses.

Torch has no attention over a paged cache: on CPU the alternative is gathering each decode's
blocks into a padded copy every layer (attention.TorchSDPA), which moves the whole context three
times (read, write, read again) where a kernel that follows the block table reads it once.
``csrc/paged_decode.cpp`` is that kernel; this module compiles it on first use with
``torch.utils.cpp_extension.load`` (g++ and ninja, cached under torch's extensions folder) and
falls back to TorchSDPA, with a warning, where it cannot be built. The build is native to the
CPU (``-march=native``), so its cache key covers what the binary depends on: the source, the
flags, the compiler, torch's version and the CPU's instruction-set flags. A cache folder shared
with another kind of CPU (a container image, a network home) then builds its own copy instead
of loading one that dies on an illegal instruction.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

from scalellm.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
STALE_LOCK_S = 600.0
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only")


def build_name(source: Path, prefix: str = "scalellm_cpu") -> str:
    """The extension's name, which is its cache key (see the module docstring)."""
    key = hashlib.sha256(source.read_bytes())
    for part in (
        " ".join(CFLAGS),
        os.environ.get("CXX", "c++"),
        torch.__version__,
        platform.machine(),
        _isa(),
    ):
        key.update(b"\0" + part.encode())
    return f"{prefix}_{key.hexdigest()[:12]}"


def _isa() -> str:
    """The CPU's feature flags (Linux), else the ISA level torch dispatches to."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return str(torch.backends.cpu.get_cpu_capability())


def build(source: Path, name: str) -> None:
    """Compile and load ``source`` as extension ``name`` (a no-op when already built)."""
    from torch.utils.cpp_extension import load

    _drop_stale_lock(name)
    load(
        name=name,
        sources=[str(source)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def available() -> bool:
    """Whether the kernels are loaded (building them the first time on this machine)."""
    try:
        name = build_name(SOURCE)
        build(SOURCE, name)
        log.info("CPU kernels: %s built for %s", name, torch.backends.cpu.get_cpu_capability())
        return hasattr(torch.ops.scalellm_cpu, "paged_decode")
    except Exception as exc:  # no compiler, no ninja, an unusual platform: the torch path works
        log.warning("CPU paged-attention kernel unavailable (%s); using torch SDPA with a gather", exc)
        return False


def _drop_stale_lock(name: str) -> None:
    """torch's builder waits without limit on the lock file of a build that was killed midway;
    a lock older than any real build is such a leftover."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("removed a stale build lock %s", lock)


class CpuPagedDecode:
    """Decodes read K/V from the cache blocks directly (see csrc/paged_decode.cpp)."""

    name = "cpu-paged (C++ decode kernel; SDPA for prefill)"

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        return meta

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        torch.ops.scalellm_cpu.paged_decode(
            out, q, kv, meta.decode_block_tables, meta.decode_context_lens, scale
        )
        return out
