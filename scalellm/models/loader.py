"""Build a model from a Hugging Face folder (config.json + *.safetensors)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from scalellm.engine import huge_pages
from scalellm.engine.cpu_kernels import layer_ops, w8a8_kernel
from scalellm.models.config import ModelConfig
from scalellm.models.decode_stack import CpuDecodeStack
from scalellm.models.llama import LlamaForCausalLM, RotaryEmbedding
from scalellm.models.packed_linear import (
    PanelLinear,
    pack_linears,
    packing_supported,
    panels_apply,
    panels_isa,
)
from scalellm.models.parallel import SINGLE, TensorParallel
from scalellm.models.quant_linear import quantize_weights, weight_bytes

log = logging.getLogger(__name__)


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model folder {model_dir} has no *.safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def load_model(
    model_dir: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str = "none",
    tp: TensorParallel = SINGLE,
) -> LlamaForCausalLM:
    """Allocate the model (this rank's slices under ``tp``) on ``device`` without random init,
    then copy the checkpoint in; then quantize its weights (``quantization`` other than none) or
    pack them for oneDNN."""
    model = _allocate(cfg, dtype, device, max_positions, tp)
    model.load_weights(iter_safetensors(model_dir))
    return _finish(model, device, dtype, quantization)


def random_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, seed: int = 0
) -> LlamaForCausalLM:
    """``cfg``'s model with random weights drawn on ``device`` (normal, std 0.02; norms 1): for
    benchmarks of shapes whose checkpoints are not at hand (bench/decode_roofline.py builds an
    8B-shaped Llama on the GPU this way, without a 16 GB file). Otherwise as load_model."""
    model = _allocate(cfg, dtype, device, max_positions, SINGLE)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return _finish(model, device, dtype, "none")


def _allocate(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, tp: TensorParallel
) -> LlamaForCausalLM:
    ops = layer_ops(device, dtype)
    log.info("decoder layer ops: %s", ops.name)
    with torch.device(device):  # float32 tables (cast per use), as in transformers
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, rotary, ops, tp)
    # Module.to_empty's empty_like on meta tensors imports sympy (1.3 s of every start): allocate
    # each tensor directly, floating point ones straight in the model's dtype.
    model = model._apply(
        lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
    )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _finish(
    model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, quantization: str
) -> LlamaForCausalLM:
    if quantization != "none":
        kernel = w8a8_kernel(device, dtype) if quantization == "w8a8" else None
        count = quantize_weights(model, quantization, kernel)
        log.info("weights: %s, %d quantized, %.0f MB", quantization, count, weight_bytes(model) / 1e6)
    elif panels_apply(device, dtype):
        count = pack_linears(model, PanelLinear)
        log.info(
            "linear layers: %d through the panel kernel (%s, its %s build on this CPU)",
            count,
            str(dtype).removeprefix("torch."),
            panels_isa(dtype),
        )
    elif packing_supported(device, dtype):
        log.info("linear layers: oneDNN, %d weights reordered for this CPU", pack_linears(model))
    if device.type == "cpu" and (moved := huge_pages.move_module(model)):
        log.info("weights: %.0f MB in memory advised for 2 MB pages", moved / 1e6)
    model.decode_stack = CpuDecodeStack.of(model)  # None off CPU: no C++ fused ops there
    if model.decode_stack is not None:
        log.info("decode steps: every layer in one C++ call (decode_layers)")
    return model.eval()
