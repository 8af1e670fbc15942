"""The one place that runs torch: owns the model and the KV cache, turns a scheduled step into
tensors, runs the forward pass and samples.

The KV cache is one block-major tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]`` (2 = K, V). A block holds every layer's K and V of its tokens in one contiguous
span, so a run of consecutive block ids is one contiguous slice: the transfer layer puts such runs
on the wire as they are, with no gather or scatter copy. Each layer sees the strided view
``kv_cache[:, layer]``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalellm.engine.attention import AttentionBackend, AttentionMetadata, PrefillSpan, select_backend
from scalellm.engine.config import EngineConfig
from scalellm.engine.kv_quant import Int8KVSDPA, KVCacheFormat
from scalellm.engine.request import Request
from scalellm.engine.sampler import Sampler, SamplerOutput, token_logprobs
from scalellm.engine.scheduler import ScheduledRequest
from scalellm.models.config import ModelConfig
from scalellm.models.loader import load_model

log = logging.getLogger(__name__)

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    """Row of each sampling request's last token in the flattened batch."""
    sampling: list[Request]
    prompt_rows: tuple[tuple[Request, list[int], list[int]], ...] = ()
    """Requests that want prompt logprobs: (request, rows of the batch, the prompt token each row
    predicts); see ModelRunner._prompt_rows."""


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(model_config.torch_dtype)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.block_size = config.block_size
        assert config.model is not None, "LLMEngine resolves the model folder first"
        self.model = load_model(
            Path(config.model), model_config, self.dtype, self.device, max_model_len, config.quantization
        )
        self.kv_format = KVCacheFormat.resolve(config.kv_cache_dtype, self.dtype, model_config.head_dim)
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit()
        self.kv_cache = torch.zeros(
            self.num_blocks,
            model_config.num_layers,
            2,
            self.block_size,
            model_config.num_kv_heads,
            self.kv_format.row_width,
            dtype=self.kv_format.dtype,
            device=self.device,
        )
        self.sampler = Sampler(self.device)
        self.attention: AttentionBackend = (
            Int8KVSDPA(self.dtype) if self.kv_format.quantized else select_backend(self.device)
        )
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

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * self.kv_format.row_bytes

    def _blocks_that_fit(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.gpu_memory_utilization
        else:
            budget = self.config.kv_cache_gb * 2**30
        return max(1, int(budget // self.bytes_per_block))

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> tuple[list[Request], SamplerOutput]:
        """Run one step; returns the requests that sampled a token and what they sampled."""
        inputs = self.prepare(scheduled)
        with self._attention_kernels():
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        for req, rows, targets in inputs.prompt_rows:
            logits = self.model.compute_logits(hidden[self._tensor(rows)]).float()
            k = req.sampling_params.prompt_logprobs or 0
            found = token_logprobs(logits, self._tensor(targets), [k] * len(rows))
            req.prompt_logprobs.extend(lp for lp in found if lp is not None)
        if not inputs.sampling:
            return [], SamplerOutput([], [])
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        return inputs.sampling, self.sampler(logits, inputs.sampling)

    def _attention_kernels(self) -> contextlib.AbstractContextManager[None]:
        """On CUDA, SDPA may use flash, memory-efficient or math kernels but not cuDNN's, which
        builds a plan for every new shape (see attention.sdpa); elsewhere, torch's choice."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(_CUDA_SDPA_BACKENDS)

    def prepare(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        """Flatten a step: decodes (one token each) first, then prefill chunks."""
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []  # the block of each new token (its offset is position % bs)
        sample_rows: list[int] = []
        sampling: list[Request] = []

        for s in decodes:
            req, pos = s.request, s.request.num_computed_tokens
            input_ids.append(req.token_ids[pos])
            positions.append(pos)
            slot_blocks.append(req.block_ids[pos // bs])
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(req)

        spans: list[PrefillSpan] = []
        prompt_rows: list[tuple[Request, list[int], list[int]]] = []
        for s in prefills:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            offset = len(input_ids)
            input_ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_blocks.extend(req.block_ids[p // bs] for p in range(start, start + n))
            table = req.block_ids[: -(-(start + n) // bs)] if start else []
            spans.append(PrefillSpan(offset, offset + n, start, self._tensor(table)))
            if s.samples:
                sample_rows.append(offset + n - 1)
                sampling.append(req)
            if req.sampling_params.prompt_logprobs is not None:
                prompt_rows.extend(self._prompt_rows(req, offset, start, n))

        block_tables = context = None
        if decodes:
            width = max(len(s.request.block_ids) for s in decodes)
            block_tables = self._tensor(
                [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in decodes]
            )
            context = self._tensor([s.request.num_computed_tokens + 1 for s in decodes])

        position_tensor = self._tensor(positions)
        meta = AttentionMetadata(
            self._tensor(slot_blocks),
            position_tensor % bs,
            len(decodes),
            block_tables,
            context,
            tuple(spans),
            self.attention,
        )
        meta = self.attention.prepare(meta, bs)
        return StepInputs(
            self._tensor(input_ids),
            position_tensor,
            meta,
            self._tensor(sample_rows),
            sampling,
            tuple(prompt_rows),
        )

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
