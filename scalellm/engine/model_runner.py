"""The one place that runs torch: owns the model and the KV cache, turns a scheduled step into
tensors, runs the forward pass and samples.

The KV cache is one block-major tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]`` (2 = K, V). A block holds every layer's K and V of its tokens in one contiguous
span, so a run of consecutive block ids is one contiguous slice: the transfer layer puts such runs
on the wire as they are, with no gather or scatter copy. Each layer sees the strided view
``kv_cache[:, layer]``. Pure-decode steps of up to ``graph_limit`` sequences run through
``cuda_graphs.DecodeGraphs`` (a CUDA graph per batch-size bucket; bucketed without capture on
CPU), whose padding rows write one scratch block allocated past ``kv_cache``'s.

Under tensor parallelism (``tensor_parallel_size`` N > 1) this runner is rank 0 of N: it starts
the other ranks (engine/tp_ranks.py), sends each step to them as ``SeqStep``s, and holds the
heads ``[0, num_kv_heads / N)`` of the KV cache; rank r's runner holds the r-th slice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalellm.engine import cpu_kernels, huge_pages
from scalellm.engine.attention import AttentionBackend, select_backend
from scalellm.engine.config import EngineConfig
from scalellm.engine.cuda_graphs import DecodeGraphs, graph_buckets, graph_limit, why_eager
from scalellm.engine.host_copy import host_ints, upload
from scalellm.engine.kv_quant import KVCacheFormat
from scalellm.engine.request import Request
from scalellm.engine.sampler import Drawn, Sampler, SamplerOutput
from scalellm.engine.scheduler import ScheduledRequest
from scalellm.engine.step_inputs import SeqStep, StepInputs, build_inputs
from scalellm.engine.tp_ranks import TPRanks, broadcast_ints
from scalellm.models.config import ModelConfig
from scalellm.models.llama import LlamaForCausalLM
from scalellm.models.loader import load_model
from scalellm.models.parallel import SINGLE, TensorParallel, check_divisible

log = logging.getLogger(__name__)

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ForwardPass:
    """A step's forward pass, launched: ``ModelRunner.sample`` draws its tokens."""

    scheduled: list[ScheduledRequest]
    inputs: StepInputs
    hidden: torch.Tensor


@dataclass(frozen=True)
class LaunchedStep:
    """A step whose tokens are drawn on the device and on their way to the host: the requests
    that sample in it and what they drew. With async scheduling the engine reads them one step
    later, while the next step runs."""

    requests: list[Request]
    drawn: Drawn
    """Its ``token_ids`` are what the next step feeds to these requests' pending rows."""
    host: list[torch.Tensor]
    """``drawn``'s tensors on the host once ``copied`` has happened (pinned; asynchronous on CUDA)."""
    copied: torch.cuda.Event | None

    @classmethod
    def start(cls, requests: list[Request], drawn: Drawn) -> LaunchedStep:
        """Queue the copy to the host right behind the step, before any later step is launched:
        a copy issued later would wait for that step too."""
        if drawn.token_ids.device.type != "cuda":
            return cls(requests, drawn, drawn.tensors(), None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in drawn.tensors()]
        for dst, src in zip(host, drawn.tensors(), strict=True):
            dst.copy_(src, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(requests, drawn, host, copied)

    @property
    def tokens(self) -> torch.Tensor:
        """The sampled tokens on the device."""
        return self.drawn.token_ids

    def output(self) -> SamplerOutput:
        """Wait for the step's tokens and logprobs (only for them: later steps may still run)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.drawn.output(self.host)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        max_model_len: int,
        tp: TensorParallel | None = None,
        model: LlamaForCausalLM | None = None,
    ) -> None:
        """``tp`` is given to the runners of ranks 1..N-1; rank 0's (None) starts them. ``model``:
        one already built on the device in the runner's dtype (loader.random_model, for
        benchmarks of shapes without a checkpoint: bench/decode_roofline.py); None (what the
        engine passes) loads ``config.model``."""
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(model_config.torch_dtype)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        elif config.tensor_parallel_size > 1 and self.device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
        self.block_size = config.block_size
        assert model is None or config.tensor_parallel_size == 1, "a built model is a single rank's"
        self.ranks: TPRanks | None = None
        if tp is None and config.tensor_parallel_size > 1:
            check_divisible(model_config, config.tensor_parallel_size, config.expert_parallel)
            self.ranks = TPRanks.start(config, max_model_len)
        self.tp = tp or (self.ranks.tp if self.ranks is not None else SINGLE)
        with self._ranks_killed_on_error():
            if model is None:
                assert config.model is not None, "LLMEngine resolves the model folder first"
                model = load_model(
                    Path(config.model),
                    model_config,
                    self.dtype,
                    self.device,
                    max_model_len,
                    config.quantization,
                    self.tp,
                )
            self.model = model
            self.kv_format = KVCacheFormat.resolve(config.kv_cache_dtype, self.dtype, model_config.head_dim)
            self.num_kv_heads = model_config.num_kv_heads // self.tp.size
            """This rank's K/V heads: [rank * num_kv_heads, (rank + 1) * num_kv_heads) of the model's."""
            self.num_blocks = self._agree(config.num_kv_blocks or self._blocks_that_fit())
            self.attention: AttentionBackend = select_backend(
                self.device,
                block_size=self.block_size,
                dtype=self.dtype,
                head_dim=model_config.head_dim,
                int8_kv=self.kv_format.quantized,
            )
            eager_reason = why_eager(config, model_config, self.attention, self.kv_format.quantized)
            scratch = 0 if eager_reason else 1
            shape = (
                self.num_blocks + scratch,
                model_config.num_layers,
                2,
                self.block_size,
                self.num_kv_heads,
                self.kv_format.row_width,
            )
            self._kv_blocks = (
                huge_pages.zeros(shape, self.kv_format.dtype)  # a step reads its blocks: fewer TLB misses
                if self.device.type == "cpu"
                else torch.zeros(shape, dtype=self.kv_format.dtype, device=self.device)
            )
            """The cache and, with decode graphs, one scratch block past the scheduler's (cuda_graphs)."""
            self.kv_cache = self._kv_blocks[: self.num_blocks]
            """The scheduler's blocks: what everything outside the runner sees of the cache."""
            self.graphs = None if eager_reason else self._decode_graphs(max_model_len)
        if eager_reason:
            log.info("decode steps run eagerly: %s", eager_reason)
        self.sampler = Sampler(self.device, cpu_kernels.sampler_kernels(self.device))
        log.info(
            "model %s on %s (%s, weights %s), KV cache %s, %d blocks x %d tokens",
            model_config.architecture,
            self.device,
            self.dtype,
            config.quantization,
            self.kv_format.dtype,
            self.num_blocks,
            self.block_size,
        )

    def _decode_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        """Pure-decode steps up to graph_limit sequences through DecodeGraphs: captured on CUDA
        (a capture that fails leaves the steps eager, with a warning), bucketed on static
        buffers without capture elsewhere."""
        buckets = graph_buckets(graph_limit(self.config))
        capture = self.device.type == "cuda"
        try:
            graphs = DecodeGraphs(
                self.model,
                self._kv_blocks,
                self.attention,
                self.block_size,
                -(-max_model_len // self.block_size),
                buckets,
                capture,
            )
        except RuntimeError as e:
            log.warning("decode CUDA graph capture failed, decode steps run eagerly: %s", e)
            return None
        if not capture:
            log.info(
                "decode steps bucketed on static buffers for batch sizes %s (no CUDA graphs on %s)",
                ", ".join(map(str, buckets)),
                self.device,
            )
        return graphs

    @property
    def bytes_per_block(self) -> int:
        """Of this rank's cache."""
        c = self.model_config
        return 2 * c.num_layers * self.block_size * self.num_kv_heads * self.kv_format.row_bytes

    def _agree(self, num_blocks: int) -> int:
        """Every rank uses rank 0's block count (the scheduler's block ids index them all)."""
        if self.tp.size == 1:
            return num_blocks
        return broadcast_ints(self.tp, [num_blocks] if self.tp.rank == 0 else None)[0]

    def close(self) -> None:
        """Stop the other ranks (rank 0 only; idempotent)."""
        if self.ranks is not None:
            self.ranks.close()

    def gather_kv(self, block_ids: list[int]) -> torch.Tensor | None:
        """The K/V of ``block_ids`` with every head of the model, ``[n, layers, 2, block_size,
        model num_kv_heads, D]`` (a copy; under TP each rank's heads, gathered in head order):
        what a KV transfer sends whatever the sending worker's tensor-parallel size. Gathered to
        rank 0 only (the other ranks return None)."""
        if self.ranks is not None:
            self.ranks.send_gather(block_ids)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.tp.gather(self.kv_cache.index_select(0, index), dim=4)

    def empty_full_kv(self, num_blocks: int = 0) -> torch.Tensor:
        """A tensor shaped as gather_kv's results, of ``num_blocks`` zeroed blocks (the default
        0: for layouts and checks)."""
        _, layers, two, block_size, _, width = self.kv_cache.shape
        shape = (num_blocks, layers, two, block_size, self.model_config.num_kv_heads, width)
        return self.kv_cache.new_zeros(shape)

    def scatter_kv(self, block_ids: list[int], full: torch.Tensor | None) -> None:
        """The inverse of gather_kv: every rank copies its heads of ``full`` (rank 0's tensor with
        all the model's heads, in gather_kv's layout; the blocks ``block_ids`` of it) into the
        same blocks of its cache. A tensor-parallel decode worker's pushed KV lands in ``full``
        (LLMEngine.kv_landing) and reaches the ranks this way, between steps."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self.ranks is not None:
            self.ranks.send_scatter(block_ids)
        if self.tp.size == 1:
            assert full is not None
            self.kv_cache.index_copy_(0, index, full.index_select(0, index))
            return
        mine = self.kv_cache.new_empty((len(block_ids), *self.kv_cache.shape[1:]))
        parts = None
        if self.tp.rank == 0:
            assert full is not None
            parts = list(full.index_select(0, index).chunk(self.tp.size, dim=4))
        self.kv_cache.index_copy_(0, index, self.tp.scatter(mine, parts))

    @contextlib.contextmanager
    def _ranks_killed_on_error(self) -> Iterator[None]:
        """A rank 0 that fails to load leaves no follower waiting for it."""
        try:
            yield
        except BaseException:
            if self.ranks is not None:
                self.ranks.kill()
            raise

    def _blocks_that_fit(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.gpu_memory_utilization
        else:
            budget = self.config.kv_cache_gb * 2**30
        return max(1, int(budget // self.bytes_per_block))

    @torch.inference_mode()
    def forward(self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None = None) -> ForwardPass:
        """Launch a step's forward pass (on CUDA the host goes on while it runs). ``previous``
        (async scheduling, a single rank): the step still running, whose tokens the pending rows
        take on the device."""
        steps = [SeqStep.of(s) for s in scheduled]
        if self.ranks is not None:
            assert previous is None, "the ranks take their input tokens from the host"
            self.ranks.send_steps(steps)
        inputs, hidden = self._forward(steps, self._pending_rows(scheduled, previous))
        return ForwardPass(scheduled, inputs, hidden)

    @torch.inference_mode()
    def sample(self, ran: ForwardPass) -> LaunchedStep:
        """Sample a forward pass's tokens on the device, once every token its requests hold is
        known on the host (the engine applies the previous step's first: grammars and penalties
        read them), and start their copy to the host. Prompt logprobs are computed here, waiting
        for the device."""
        scheduled, inputs, hidden = ran.scheduled, ran.inputs, ran.hidden
        self._prompt_logprobs(scheduled, inputs, hidden)
        requests = [scheduled[i].request for i in inputs.sampling]
        assert not any(r.awaiting_token for r in requests), "apply the previous step's tokens first"
        if not requests:
            nothing = Drawn(torch.empty(0, dtype=torch.long, device=self.device), None, [])
            return LaunchedStep([], nothing, nothing.tensors(), None)
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        return LaunchedStep.start(requests, self.sampler.draw(logits, requests))

    def _pending_rows(
        self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The input rows holding a pending token, and each one's token from ``previous`` (both
        on the device): the decodes (one-token steps, which ``prepare`` puts first, in order) of
        requests awaiting_token."""
        if previous is None:
            return None
        decodes = [s.request for s in scheduled if s.num_new_tokens == 1]
        rows = [i for i, r in enumerate(decodes) if r.awaiting_token]
        if not rows:
            return None
        index = {id(r): j for j, r in enumerate(previous.requests)}
        found = self._ints(rows + [index[id(decodes[i])] for i in rows])
        return found[: len(rows)], previous.tokens.index_select(0, found[len(rows) :])

    @torch.inference_mode()
    def run_steps(self, steps: list[SeqStep]) -> tuple[list[int], torch.Tensor | None]:
        """The forward pass of a step (every rank runs it): which steps sample, and their logits."""
        inputs, hidden = self._forward(steps)
        if not inputs.sampling:
            return [], None
        return inputs.sampling, self.model.compute_logits(hidden[inputs.sample_indices])

    def _forward(
        self, steps: list[SeqStep], pending: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[StepInputs, torch.Tensor]:
        inputs = self.prepare(steps)
        if pending is not None:
            inputs.input_ids.index_copy_(0, *pending)
        hidden = None
        if self.graphs is not None:  # a pure-decode step its buckets hold; else None
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        if hidden is None:
            with self._attention_kernels():
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        return inputs, hidden

    def _prompt_logprobs(
        self, scheduled: list[ScheduledRequest], inputs: StepInputs, hidden: torch.Tensor
    ) -> None:
        """Append the prompt logprobs of the prefill chunks whose requests ask for them (rank 0
        only: the engine refuses prompt_logprobs under tensor parallelism, where compute_logits
        is a collective every rank would have to join)."""
        for i, offset in inputs.prefill_offsets.items():
            s = scheduled[i]
            req = s.request
            if req.sampling_params.prompt_logprobs is None:
                continue
            for _, rows, targets in self._prompt_rows(req, offset, req.num_computed_tokens, s.num_new_tokens):
                logits = self.model.compute_logits(hidden[self._tensor(rows)])
                k = req.sampling_params.prompt_logprobs or 0
                req.prompt_logprobs.extend(self.sampler.token_logprobs(logits, self._tensor(targets), k))

    def _attention_kernels(self) -> contextlib.AbstractContextManager[None]:
        """On CUDA, SDPA may use flash, memory-efficient or math kernels but not cuDNN's, which
        builds a plan for every new shape (see attention.sdpa); elsewhere, torch's choice."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(_CUDA_SDPA_BACKENDS)

    def prepare(self, steps: list[SeqStep]) -> StepInputs:
        """A step's rows on the device (step_inputs.build_inputs)."""
        return build_inputs(steps, self.block_size, self.attention, self._ints)

    @staticmethod
    def _prompt_rows(
        req: Request, offset: int, start: int, n: int
    ) -> list[tuple[Request, list[int], list[int]]]:
        """The rows of a prefill chunk whose logits give prompt logprobs not yet computed: the
        row of position p predicts prompt token p + 1 (the last prompt position predicts the
        first output token, which the sampler reports). A recompute after preemption adds none.

            prompt   t0 t1 t2 t3 t4        chunk = positions start .. start + n - 1
            row p    -> t(p+1)             for max(start, done) <= p < min(start + n, P - 1)
        """
        first = max(start, len(req.prompt_logprobs))
        last = min(start + n, req.num_prompt_tokens - 1)
        if first >= last:
            return []
        rows = [offset + p - start for p in range(first, last)]
        return [(req, rows, req.prompt_token_ids[first + 1 : last + 1])]

    def _tensor(self, data: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _ints(self, data: list[int]) -> torch.Tensor:
        """``_tensor`` of a flat list, through host_copy.host_ints (0.2 against torch.tensor's
        0.7 ms for the 10k of a 256-sequence decode step); on CUDA through pinned memory."""
        return upload(host_ints(data), self.device)
