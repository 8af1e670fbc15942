"""CPU kernels of our own, built once per machine with the C++ compiler torch uses.

Torch has no attention over a paged cache: on CPU the alternative is gathering each decode's
blocks into a padded copy every layer (attention.TorchSDPA), which moves the whole context three
times (read, write, read again) where a kernel that follows the block table reads it once.
``csrc/paged_decode.cpp`` is that kernel; this module compiles it on first use with
``torch.utils.cpp_extension.load`` (g++ and ninja, cached under torch's extensions folder by a
hash of the source, the flags and the CPU, so a machine builds it once) and falls back to
TorchSDPA, with a warning,
where it cannot be built.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from scalellm.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only")


@functools.cache
def available() -> bool:
    """Whether the kernels are loaded (building them the first time on this machine)."""
    try:
        from torch.utils.cpp_extension import load

        name = f"scalellm_cpu_{_build_key()}"
        with build_turn(name):
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        return hasattr(torch.ops.scalellm_cpu, "paged_decode")
    except Exception as exc:  # no compiler, no ninja, an unusual platform: the torch path works
        log.warning("CPU paged-attention kernel unavailable (%s); using torch SDPA with a gather", exc)
        return False


def _build_key() -> str:
    """Names the build by everything that shapes it: the source, the flags, torch, and the CPU's
    instruction sets (-march=native). torch rebuilds in place, and every other process waits,
    whenever one name is asked for with another source or other flags."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update("\0".join((*CFLAGS, torch.__version__, _cpu_isa())).encode())
    return digest.hexdigest()[:12]


def _cpu_isa() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    return platform.processor()


@contextlib.contextmanager
def build_turn(name: str) -> Iterator[None]:
    """Builders of one kernel take turns under an flock, which the OS drops when its holder dies.

    torch's builder guards its folder with a plain ``lock`` file and waits for it without limit,
    so a build killed midway (a timeout, Ctrl-C) left every later engine start hanging. Whoever
    holds our flock is the only builder of ours, so a ``lock`` file found then is such a leftover.
    """
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    with open(folder.parent / f"{name}.flock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            stale.unlink()
            log.warning("removed %s, left by a build that was killed midway", stale)
        yield


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
