"""Pure-decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of B sequences is about 50 kernel launches per layer whatever B is, so at small
batches the GPU waits on the host. ``DecodeGraphs`` owns static input buffers sized for its
largest bucket and, on CUDA, one captured ``torch.cuda.CUDAGraph`` per bucket (1, 2, 4, 8, 16,
24, ... up to the limit; all in one memory pool, captured largest first after a warm-up run). A
step of B decodes takes the smallest bucket b >= B: its inputs are copied into rows [0, B) of the
buffers, rows [B, b) are padding, the bucket's graph replays and rows [0, B) of the static output
are the step's hidden states. Sampling (and compute_logits) stays outside the graph.

    static row   input_id  position  slot (block, offset)  block table     context len
    0 .. B-1     the step's, as ModelRunner.prepare made them
    B .. b-1     0         0         (scratch, 0)          [scratch, ...]  1

Padding rows write their K/V into slot 0 of the scratch block, a block past the scheduler's (the
runner allocates it: no request can own it), and attend to that one slot, so they never touch a
request's cache and every row is computed independently of the others (each op is per row; the
graph-safe attention backends read only a row's own context). Columns of the static block table
past a row's context are stale and never read.

On CPU nothing is captured: the same buffers and padding run the model eagerly ("eager replay"),
which is what the CPU tests check. Steps with prefill chunks, more decodes than the largest bucket
or a wider block table than the buffers run eagerly as before (``run`` returns None). Which
engines use it at all is ``graph_limit`` / ``why_eager``.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from scalellm.engine.attention import AttentionBackend, AttentionMetadata
from scalellm.engine.config import EngineConfig
from scalellm.models.config import ModelConfig
from scalellm.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

AUTO_MAX_BATCH = 256
"""The largest bucket on CUDA when EngineConfig.cuda_graph_max_batch is None."""


def graph_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8 up to ``limit``, and ``limit`` itself (empty for 0)."""
    sizes = {b for b in (1, 2, 4) if b <= limit} | set(range(8, limit + 1, 8))
    if limit > 0:
        sizes.add(limit)
    return tuple(sorted(sizes))


def pick_bucket(buckets: tuple[int, ...], batch: int) -> int | None:
    """The smallest bucket holding ``batch`` rows (None: above the largest)."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


def graph_limit(config: EngineConfig) -> int:
    """The largest bucket the config asks for: cuda_graph_max_batch (None: AUTO_MAX_BATCH on
    CUDA, 0 elsewhere), never above max_num_seqs (no decode batch is larger)."""
    limit = config.cuda_graph_max_batch
    if limit is None:
        limit = AUTO_MAX_BATCH if config.torch_device().type == "cuda" else 0
    return min(limit, config.max_num_seqs)


def why_eager(
    config: EngineConfig, model_config: ModelConfig, backend: AttentionBackend, quantized_kv: bool
) -> str | None:
    """Why this engine's decode steps cannot run bucketed (None: they can, up to graph_limit)."""
    if graph_limit(config) == 0:
        return "cuda_graph_max_batch is 0 (the default off CUDA)"
    if config.tensor_parallel_size > 1:
        return "tensor parallelism (its all-reduces are gloo collectives on the host)"
    if quantized_kv and not backend.graph_safe:
        return "an int8 KV cache (its backend gathers and dequantizes the whole block table)"
    if not backend.graph_safe:
        return f"the attention backend {backend.name} is not graph-safe"
    if model_config.moe is not None:
        return "a mixture-of-experts model (its expert grouping reads token counts on the host)"
    return None


class DecodeGraphs:
    """Static buffers and, with ``capture``, one CUDA graph per bucket (see the module docstring).

    ``kv_blocks`` is the runner's whole cache tensor: the scheduler's blocks and, last, the
    scratch block the padding rows write into."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_blocks: torch.Tensor,
        backend: AttentionBackend,
        block_size: int,
        max_blocks_per_seq: int,
        buckets: tuple[int, ...],
        capture: bool,
    ) -> None:
        assert buckets and backend.graph_safe
        self.model = model
        self.kv_blocks = kv_blocks
        self.backend = backend
        self.block_size = block_size
        self.buckets = buckets
        self.scratch_block = kv_blocks.shape[0] - 1
        self.replays = 0
        """Steps run through the buckets (for tests and benchmarks)."""
        rows, device = buckets[-1], kv_blocks.device
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        self.input_ids = zeros.clone()
        self.positions = zeros.clone()
        self.slot_blocks = zeros.clone()
        self.slot_offsets = zeros.clone()
        self.block_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.long, device=device)
        self.context_lens = zeros.clone()
        self.hidden = torch.zeros(
            rows, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype, device=device
        )
        self._pad(0, rows)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """The hidden states [B, hidden] of a pure-decode step of B rows (``ModelRunner.prepare``'s
        tensors), through its bucket; None when the step is not one a bucket runs. The result is
        a view of the static output: read it before the next step."""
        n = input_ids.shape[0]
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        if meta.prefills or meta.num_decode_tokens != n or tables is None or lens is None:
            return None
        bucket = pick_bucket(self.buckets, n)
        if bucket is None or tables.shape[1] > self.block_tables.shape[1]:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_blocks[:n].copy_(meta.slot_blocks)
        self.slot_offsets[:n].copy_(meta.slot_offsets)
        self.block_tables[:n, : tables.shape[1]].copy_(tables)
        self.context_lens[:n].copy_(lens)
        self._pad(n, bucket)
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._forward(bucket)
        self.replays += 1
        return self.hidden[:n]

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) become padding: token 0 at position 0, writing and reading only
        slot 0 of the scratch block."""
        if start >= end:
            return
        for buf in (self.input_ids, self.positions, self.slot_offsets):
            buf[start:end].fill_(0)
        self.slot_blocks[start:end].fill_(self.scratch_block)
        self.block_tables[start:end, 0].fill_(self.scratch_block)
        self.context_lens[start:end].fill_(1)

    def _forward(self, rows: int) -> None:
        """The model over the first ``rows`` static rows, into the static output (what a graph
        captures)."""
        meta = AttentionMetadata.decodes(
            self.slot_blocks[:rows],
            self.slot_offsets[:rows],
            self.block_tables[:rows],
            self.context_lens[:rows],
            self.backend,
        )
        meta = self.backend.prepare(meta, self.block_size)
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], self.kv_blocks, meta)
        self.hidden[:rows].copy_(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool; each after a warm-up run
        (Triton compiles its kernels, cuBLAS picks its own, outside the capture). Every row is
        padding meanwhile, so nothing but the scratch block is written."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._forward(bucket)
            torch.cuda.synchronize(self.kv_blocks.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.kv_blocks.device)
        log.info(
            "decode CUDA graphs captured for batch sizes %s in %.1f s",
            ", ".join(map(str, self.buckets)),
            time.perf_counter() - start,
        )
