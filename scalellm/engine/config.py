"""The engine's configuration: one frozen dataclass, resolved against the model folder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int8", "w8a8", "fp8")
"""Weight formats; fp8 needs a CUDA GPU with fp8 matmuls and is refused elsewhere."""
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting, once: the offline LLM takes them as keyword arguments, the worker
    services as flags (scalellm/worker/config.py). ``model`` None is the prepared demo model."""

    model: str | None = None
    """A Hugging Face Llama-family folder."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto: on CUDA the checkpoint's half type; on a CPU with native
    bfloat16 arithmetic (AMX or AVX512-BF16) bfloat16; on other CPUs float32."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    """KV cache size in blocks; None sizes it from kv_cache_gb (CPU) or free GPU memory."""
    kv_cache_gb: float = 2.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    """Context length; None: the model's, capped so one request always fits in the cache."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_tokens_with_decodes: int = 256
    """Most prompt tokens in a step while any running request decodes. Small keeps the running
    streams' inter-token latency low while prompts arrive; up to max_num_batched_tokens runs
    prefill in bigger chunks, which a CPU computes faster: throughput over ITL
    (docs/benchmarks.md: 20-30% more offline on two cores, for a longer ITL tail)."""
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    quantization: str = "none"
    """Weights: none (the model's dtype), int8 (weight-only, a scale per output channel, computed
    at load; models/quant_linear.py), fp8 (not on CPU)."""
    kv_cache_dtype: str = "auto"
    """KV cache: auto (the model's dtype) or int8 (a scale per token and head; about half the
    bytes of bfloat16; engine/kv_quant.py)."""
    tensor_parallel_size: int = 1
    """Ranks (processes) the model is split over: heads, MLP rows, experts and the vocabulary
    (models/parallel.py); one scheduler on rank 0 (engine/tp_ranks.py). CPU (gloo) only for now."""
    expert_parallel: bool = False
    """Mixture-of-experts models under tensor_parallel_size N > 1: place the experts whole on the
    ranks (E/N each; N must divide the expert count) instead of splitting every expert's
    intermediate rows over them. Fewer, larger matmuls per rank; balance then depends on routing.
    No effect at size 1 or on dense models."""
    cuda_graph_max_batch: int | None = None
    """Pure-decode steps of up to this many sequences replay a CUDA graph captured at startup per
    batch-size bucket (1, 2, 4, 8, 16, 24, ...; engine/cuda_graphs.py); 0: never. None: 256 on
    CUDA, 0 elsewhere. Capped at max_num_seqs. Off under tensor parallelism, with an int8 KV
    cache and for mixture-of-experts models. On CPU a positive value runs the same bucketed
    static buffers without capture (what the CPU tests check; no speed-up there)."""
    async_scheduling: bool = False
    """Overlap the host's work with the device's: each step's forward pass is scheduled and
    launched while the previous step still runs, its decode inputs taken on the device from the
    previous step's sampled tokens, which are applied before the step samples (engine.py,
    ``LLMEngine.step``). A request that finishes in a step still rides in the next one (its row is
    discarded). Every kind of request overlaps (grammars, penalties, logprobs). For GPUs, where
    the host would otherwise leave the device idle between steps; a CPU computes everything at
    launch, so there it only reports each token one step later (the engine warns). Not under
    tensor parallelism."""

    num_speculative_tokens: int = 0
    """Speculative decoding by prompt lookup (engine/speculative.py): each step, a request
    without logits controls whose last tokens occurred earlier in its sequence feeds up to this
    many tokens that followed them, and keeps those its own draws agree with (the output is
    unchanged). 0: off. Not with async_scheduling."""
    prompt_lookup_min: int = 2
    """The shortest run of final tokens looked up for drafts."""
    prompt_lookup_max: int = 4
    """The longest run of final tokens looked up for drafts (the longest found is used)."""
    speculative_max_rows: int | None = None
    """Drafts go only into a step whose decode rows (a decoding request's token and each draft
    are a row) stay within this many: up to a few rows a step costs what reading the weights
    costs, past that every row costs its arithmetic (bench/speculative.py: on a 2-core AVX2 CPU
    5 rows of the demo model take 1.2x one row's time, and 8 requests drafting lost 1-4%). None:
    6 on CPU, 64 on CUDA (not measured there yet)."""

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_prefill_tokens_with_decodes < 1:
            raise ValueError(
                f"max_prefill_tokens_with_decodes must be positive, got {self.max_prefill_tokens_with_decodes}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.cuda_graph_max_batch is not None and self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be 0 or more, got {self.cuda_graph_max_batch}")
        self._check_compression()
        self._check_tensor_parallel()
        self._check_speculative()

    def _check_speculative(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be 0 or more, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.speculative_max_rows is not None and self.speculative_max_rows < 2:
            raise ValueError(f"speculative_max_rows must be at least 2, got {self.speculative_max_rows}")
        if self.num_speculative_tokens == 0:
            return
        if self.async_scheduling:
            raise ValueError(
                "num_speculative_tokens needs synchronous steps: a step's drafts depend on how many "
                "of the previous step's the model accepted (turn async_scheduling off)"
            )

    def _check_compression(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.quantization == "w8a8" and self.torch_device().type != "cpu":
            raise ValueError(
                f"quantization w8a8 runs on CPU (this engine runs on {self.torch_device()}): use int8 or fp8 there"
            )
        if self.quantization == "fp8" and self.torch_device().type != "cuda":
            raise ValueError(
                "quantization fp8 needs a CUDA GPU with fp8 matmuls (compute capability 8.9+); "
                f"this engine runs on {self.torch_device()}: use int8 there"
            )

    def _check_tensor_parallel(self) -> None:
        size = self.tensor_parallel_size
        if size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {size}")
        if size == 1:
            return
        if self.async_scheduling:
            raise ValueError(
                f"async_scheduling is not supported with tensor_parallel_size {size}: the ranks take "
                "their input tokens from the host"
            )
        if self.torch_device().type != "cpu":
            raise ValueError(
                f"tensor_parallel_size {size}: tensor parallelism runs on CPU (gloo) in this version, "
                f"not on {self.torch_device()}"
            )
        if self.quantization != "none" or self.kv_cache_dtype != "auto":
            raise ValueError(
                f"tensor_parallel_size {size} is not supported with quantization {self.quantization!r} "
                f"or kv_cache_dtype {self.kv_cache_dtype!r} yet; use none / auto"
            )

    def draft_rows(self) -> int:
        """speculative_max_rows resolved (0 when speculative decoding is off)."""
        if self.num_speculative_tokens == 0:
            return 0
        if self.speculative_max_rows is not None:
            return self.speculative_max_rows
        return 64 if self.torch_device().type == "cuda" else 6

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return (
            _DTYPES.get(checkpoint_dtype, torch.bfloat16) if checkpoint_dtype != "float32" else torch.bfloat16
        )


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16, and a oneDNN that uses them: where bfloat16 matmuls run at
    about twice the float32 rate instead of being emulated."""
    cpu = torch.cpu
    native = bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    return (
        native and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
