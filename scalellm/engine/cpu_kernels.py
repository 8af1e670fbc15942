"""CPU kernels of our own, built once per machine with the C++ compiler torch uses.

Torch has no attention over a paged cache: on CPU the alternative is gathering each decode's
blocks into a padded copy every layer (attention.TorchSDPA), which moves the whole context three
times (read, write, read again) where a kernel that follows the block table reads it once.
``csrc/paged_decode.cpp`` is that kernel; this module compiles it on first use with
``torch.utils.cpp_extension.load`` (g++ and ninja, cached under torch's extensions folder) and
falls back to TorchSDPA, with a warning, where it cannot be built. The build is native to the
CPU (``-march=native``), so its cache key covers what the binary depends on: the source, the
flags, the compiler, torch's version and the CPU's instruction-set flags (and the sources' paths).
A cache folder shared with another kind of CPU (a container image, a network home) then builds
its own copy instead of loading one that dies on an illegal instruction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import logging
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from scalellm.engine.attention import AttentionMetadata, PrefillSpan, prefill_span
from scalellm.engine.host_copy import host_ints
from scalellm.engine.sampler import SamplerKernels
from scalellm.models import ops_triton
from scalellm.models.ops import LayerOps, TorchOps

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    CSRC / "paged_decode.cpp",
    CSRC / "fused_ops.cpp",
    CSRC / "quant_ops.cpp",
    CSRC / "linear_panels.cpp",
    CSRC / "argmax.cpp",
    CSRC / "sample.cpp",
    CSRC / "logprobs.cpp",
    CSRC / "penalties.cpp",
    CSRC / "decode_stack.cpp",
)
HEADERS = (CSRC / "kernels.h", CSRC / "vec256.h", CSRC / "vec512.h")
# -ffp-contract=off: a * b + c * d stays two roundings and a sum, as torch's separate ops compute it;
# -fno-reciprocal-math: x / s stays a division (W8A8's scalar quantization loop, which AVX2-only
# CPUs run, rounded x * (1 / s) otherwise: one quantization step off near halves)
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fno-reciprocal-math",
    "-ffp-contract=off",
)


def build_name(files: tuple[Path, ...], prefix: str = "scalellm_cpu") -> str:
    """The extension's name, which is its cache key (see the module docstring)."""
    key = hashlib.sha256()
    for path in files:  # the path too: two checkouts sharing one cache folder would rebuild each
        key.update(str(path.resolve()).encode() + b"\0" + path.read_bytes())  # other's build by turns
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


def build(sources: tuple[Path, ...], name: str) -> None:
    """Compile and load ``sources`` as extension ``name`` (a no-op when already built)."""
    from torch.utils.cpp_extension import load

    with build_turn(name):
        load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )


@functools.cache
def available() -> bool:
    """Whether the kernels are loaded (building them the first time on this machine)."""
    try:
        name = build_name(SOURCES + HEADERS)
        build(SOURCES, name)
        log.info("CPU kernels: %s built for %s", name, torch.backends.cpu.get_cpu_capability())
        return hasattr(torch.ops.scalellm_cpu, "paged_decode")
    except Exception as exc:  # no compiler, no ninja, an unusual platform: the torch path works
        log.warning("CPU paged-attention kernel unavailable (%s); using torch SDPA with a gather", exc)
        return False


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


ROWS_PREFILL_MAX_TOKENS = {torch.bfloat16: 1024, torch.float32: 512}
"""The longest context (cached tokens + the chunk) a prefill chunk attends through the C++ rows
kernel, where the tile kernel does not run (AVX2 CPUs; bfloat16 without AVX512-BF16; head sizes
other than 64 and 128); longer chunks go to torch's SDPA one at a time. The rows kernel scores a
chunk's rows as decodes (``prefill_items`` in csrc/paged_decode.cpp) at a steady ~0.1 TFLOPS in
bfloat16 and ~0.07 in float32 on two Zen 4 cores, where SDPA's flash kernel gains with length:
2.0x / 1.4x SDPA's speed on 128-token prompts, level at ~1-2k tokens in bfloat16 and 0.7x there
in float32 (docs/benchmarks.md, "Prefill attention on CPU")."""

TILES_PREFILL_MAX_TOKENS: dict[torch.dtype, int | None] = {torch.bfloat16: None, torch.float32: None}
"""The same for the tile kernel (``prefill_tiles``: float32 on AVX-512, bfloat16 on AVX512-BF16;
None: any length). On two Zen 4 cores bfloat16's tiles run at 2.4-4.3x SDPA's speed from 128 to
8k tokens of context, float32's at 1.2-2.5x (docs/benchmarks.md, "Long prompts; prefill tiles
without reloads; ...")."""


def max_kernel_prefill_tokens(dtype: torch.dtype, head_dim: int) -> int | None:
    """The longest context a prefill chunk attends through our kernels (None: any), else SDPA
    (the same over an int8 cache: the kernels dequantize each tile they read)."""
    if dtype not in ROWS_PREFILL_MAX_TOKENS:
        return 0
    if torch.ops.scalellm_cpu.prefill_tiles(dtype == torch.bfloat16, head_dim):
        return TILES_PREFILL_MAX_TOKENS[dtype]
    return ROWS_PREFILL_MAX_TOKENS[dtype]


SpanAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PrefillSpan, float], torch.Tensor]
"""One prefill chunk's attention through SDPA: (q, new_kv, kv, span, scale) -> [n, Hq, D]."""


@dataclass(frozen=True)
class CpuPrefillPlan:
    """Which of a step's prefill chunks go to the kernel (AttentionMetadata.prepared)."""

    tables: torch.Tensor | None
    """[S', max_blocks] block tables of the kernel's chunks (None: no chunk goes there)."""
    bounds: torch.Tensor | None
    """[S', 3] their (start row, length, cached context)."""
    long_spans: tuple[PrefillSpan, ...]
    """The chunks SDPA takes, one call each."""


class CpuPagedDecode:
    """Decodes read K/V from the cache blocks directly (see csrc/paged_decode.cpp); so do a step's
    prefill chunks, every one of them in one call a layer, up to max_kernel_prefill_tokens of
    context (longer ones through SDPA)."""

    graph_safe = True  # no capture on CPU; the bucketed static-buffer path is tested with it

    def __init__(self, max_kernel_tokens: int | None, long_span: SpanAttention | None = None) -> None:
        self.max_kernel_tokens = max_kernel_tokens
        """Chunks attending more context than this go to SDPA (None: none do)."""
        self.long_span: SpanAttention = long_span or prefill_span
        """How such a chunk attends: attention.prefill_span, or an int8 cache's
        (kv_quant.Int8KVSDPA.prefill_span: the cache's rows dequantized; the kernels read and
        write an int8 cache themselves)."""
        self.name = (
            "cpu-paged (C++ decode and prefill kernels and cache writes; SDPA for long prefill chunks)"
            if long_span is None
            else "cpu-paged over an int8 KV cache (C++ kernels; long prefill chunks dequantized for SDPA)"
        )

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        if not meta.prefills:
            return meta
        most = self.max_kernel_tokens
        fits = [most is None or s.context_len + s.end - s.start <= most for s in meta.prefills]
        long_spans = tuple(span for span, ok in zip(meta.prefills, fits, strict=True) if not ok)
        tables, bounds = meta.prefill_tables, meta.prefill_bounds
        if long_spans and tables is not None and bounds is not None:
            index = torch.tensor([k for k, ok in enumerate(fits) if ok], dtype=torch.long)
            tables, bounds = (tables[index], bounds[index]) if len(index) else (None, None)
        return dataclasses.replace(meta, prepared=CpuPrefillPlan(tables, bounds, long_spans))

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        torch.ops.scalellm_cpu.write_kv(kv, new_kv, meta.slot_blocks, meta.slot_offsets)

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        torch.ops.scalellm_cpu.paged_decode(
            out, q, kv, meta.decode_block_tables, meta.decode_context_lens, scale
        )
        return out

    def prefill(
        self,
        q: torch.Tensor,
        new_kv: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        plan = meta.prepared
        assert isinstance(plan, CpuPrefillPlan)
        if plan.tables is not None and plan.bounds is not None:
            torch.ops.scalellm_cpu.paged_prefill(out, q, kv, plan.tables, plan.bounds, scale)
        for span in plan.long_spans:
            out[span.start : span.end] = self.long_span(q, new_kv, kv, span, scale)


class CpuFusedOps:
    """models.ops.LayerOps in one C++ pass per row (csrc/fused_ops.cpp), float32 and bfloat16."""

    name = "cpu-fused (C++ rms_norm, silu_mul, rope)"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = torch.empty_like(x)
        torch.ops.scalellm_cpu.rms_norm(out, x, residual, weight, eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops.scalellm_cpu.silu_mul(out, gate_up)
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        torch.ops.scalellm_cpu.rope_(x, cos, signed_sin)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of [N, V] CPU logits, the same indices (csrc/argmax.cpp for
    float32 and bfloat16: torch's CPU argmax costs 5-16 ms for 64 rows of a 49k vocabulary;
    torch's for any other dtype)."""
    if logits.dtype not in (torch.float32, torch.bfloat16) or logits.dim() != 2 or logits.stride(-1) != 1:
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long)
    torch.ops.scalellm_cpu.argmax_rows(out, logits)
    return out


def sample(
    logits: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    min_p: list[float],
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """[N] token ids drawn from [N, V] CPU logits (float32 or bfloat16, rows contiguous), row r
    with its temperature (> 0), top_k (0: none), top_p, min_p and uniform in [0, 1): the tokens
    ``Sampler``'s torch path keeps, and the one whose running sum first exceeds u times their
    mass (csrc/sample.cpp; other dtypes are widened to float32 first, rows made contiguous)."""
    if logits.dtype not in (torch.float32, torch.bfloat16):
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.long)
    torch.ops.scalellm_cpu.sample_rows(
        out,
        logits,
        torch.tensor(temperature, dtype=torch.float32),
        torch.tensor(top_k, dtype=torch.long),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
        uniforms,
    )
    return out


def logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sampler.logprob_tensors of [N, V] CPU logits without a float32 copy of them: the log-softmax
    at token_ids [N] and the top k values and ids, float32 (csrc/logprobs.cpp; other dtypes are
    widened to float32 first, rows made contiguous)."""
    if logits.dtype not in (torch.float32, torch.bfloat16):
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.shape[0]
    chosen = torch.empty(rows, dtype=torch.float32)
    values = torch.empty(rows, k, dtype=torch.float32)
    ids = torch.empty(rows, k, dtype=torch.long)
    torch.ops.scalellm_cpu.logprob_rows(chosen, values, ids, logits, token_ids.to(torch.long).contiguous())
    return chosen, values, ids


def penalize(
    logits: torch.Tensor,
    rows: list[int],
    token_ids: list[list[int]],
    prompt_lens: list[int],
    repetition: list[float],
    frequency: list[float],
    presence: list[float],
) -> None:
    """logits_controls' penalties in place on [N, V] float32 CPU logits: row rows[i] by the
    tokens of token_ids[i] (its first prompt_lens[i] the prompt's) and the i-th penalties
    (csrc/penalties.cpp: the torch path's arithmetic, bit for bit)."""
    torch.ops.scalellm_cpu.penalize_rows(
        logits,
        torch.tensor(rows, dtype=torch.long),
        host_ints(itertools.chain.from_iterable(token_ids)),
        torch.tensor([0, *itertools.accumulate(map(len, token_ids))], dtype=torch.long),
        torch.tensor(prompt_lens, dtype=torch.long),
        torch.tensor(repetition, dtype=torch.float32),
        torch.tensor(frequency, dtype=torch.float32),
        torch.tensor(presence, dtype=torch.float32),
    )


def sampler_kernels(device: torch.device) -> SamplerKernels:
    """The sampler's C++ passes over the vocabulary where they apply (CPU, kernels built), else
    none: torch's ops."""
    if device.type != "cpu" or not available():
        return SamplerKernels()
    return SamplerKernels(argmax=argmax, sample_rows=sample, logprobs=logprobs, penalties=penalize)


W8A8_PATHS = {"scalar": 1, "avx2": 2, "vnni": 3, "amx": 4}
"""csrc/quant_ops.cpp's inner kernels of w8a8_linear by name (its ``Path`` enum); a build has
those ``torch.ops.scalellm_cpu.w8a8_paths()`` lists, and picks the last of them by default."""


def w8a8_paths() -> list[str]:
    """The names of the W8A8 kernel paths this machine's build has, slowest first."""
    built = set(torch.ops.scalellm_cpu.w8a8_paths()) if available() else set()
    return [name for name, code in W8A8_PATHS.items() if code in built]


class CpuW8A8:
    """models.quant_linear.W8A8Kernel: the activations quantized per row and group of 64 channels,
    the int8 x int8 products in int32 over the packed weight, and the scales, in one C++ call
    (csrc/quant_ops.cpp's ``w8a8_linear``: AMX int8 for tiles of 16 rows and AVX512-VNNI for the
    rest, else AVX512-VNNI, else AVX2, else scalar, by what the build and Linux allow, unless
    ``path`` names one; every path returns the same bits)."""

    name = "cpu-w8a8 (int8 activations per token and 64 channels, packed int8 weights)"

    def __init__(self, path: str | None = None) -> None:
        self.path = 0 if path is None else W8A8_PATHS[path]

    def __call__(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        out = torch.empty(x.shape[0], scales.shape[0], dtype=x.dtype)
        torch.ops.scalellm_cpu.w8a8_linear(out, x, packed, scales, bias, self.path)
        return out


def w8a8_kernel(device: torch.device, dtype: torch.dtype) -> CpuW8A8 | None:
    """The W8A8 kernel where it applies (CPU, float32 or bfloat16, kernels built), else None."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and available():
        return CpuW8A8()
    return None


def layer_ops(device: torch.device, dtype: torch.dtype) -> LayerOps:
    """The fused ops where they apply (CPU, float32 or bfloat16, kernels built: C++; CUDA in half
    types with triton: models.ops_triton), else torch's (float32 on CUDA: the reference path)."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and available():
        return CpuFusedOps()
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and ops_triton.AVAILABLE:
        return ops_triton.TritonOps()
    return TorchOps()
