"""A step of decodes through every decoder layer in one C++ call (CPU).

For a step whose rows are all decodes, ``LlamaForCausalLM.forward`` hands the layers to a
``CpuDecodeStack``: ``torch.ops.scalellm_cpu.decode_layers`` (engine/csrc/decode_stack.cpp) runs
the kernels the layer loop runs (fused norms, our panel linears, rope, the cache write, the paged
decode kernel) in the same order on the same values, so the bits are the layer loop's, without
the ~60 us a layer of module calls, dispatch and fresh tensors between them: a one-stream step of
the demo model went from 10.1 to 7.3 ms on two Zen 4 cores (docs/benchmarks.md). Steps with prefill
chunks, and models or steps the composite does not cover, run the layer loop.

``CpuDecodeStack.of`` builds one for a model it covers: dense Llama layers without q/k norms on
one rank, the fused C++ ops, every linear layer through the panel kernel (bfloat16 with a oneDNN
copy for many rows: up to that many rows). ``takes`` then checks each step: decodes only, the C++
paged backend (an int8 cache has its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scalellm.engine.attention import AttentionMetadata
from scalellm.engine.cpu_kernels import CpuFusedOps, CpuPagedDecode
from scalellm.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from scalellm.models.packed_linear import PanelLinear


@dataclass(frozen=True)
class CpuDecodeStack:
    """The model's decoder weights as the composite takes them: one list per kind, layer by layer."""

    input_norms: list[torch.Tensor]
    qkv: list[torch.Tensor]
    """Each layer's fused q/k/v weight packed in panels (PanelLinear.panels); o, gate_up, down alike."""
    qkv_bias: list[torch.Tensor]
    """Each layer's q/k/v bias, or none at all."""
    o: list[torch.Tensor]
    post_norms: list[torch.Tensor]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    num_heads: int
    intermediate: int
    eps: float
    scale: float
    max_rows: int | None
    """The most rows a step may have here (None: any): above it a bfloat16 layer runs oneDNN."""

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> CpuDecodeStack | None:
        """A stack for ``model``, or None where the composite does not compute what its layers do:
        more than one rank, a mixture of experts, q/k norms, torch's elementwise ops, a linear layer
        outside the panels (oneDNN's, quantized), a bias but on q/k/v."""
        layers = [layer for layer in model.layers if isinstance(layer, DecoderLayer)]
        if model.tp.size != 1 or not layers or len(layers) != len(model.layers):
            return None
        attn, mlp = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
        if not all(isinstance(m, MLP) for m in mlp) or any(a.q_norm is not None for a in attn):
            return None
        if not all(isinstance(layer.input_layernorm.ops, CpuFusedOps) for layer in layers):
            return None
        qkv, o = [a.qkv_proj for a in attn], [a.o_proj for a in attn]
        gate_up = [m.gate_up_proj for m in mlp if isinstance(m, MLP)]
        down = [m.down_proj for m in mlp if isinstance(m, MLP)]
        linears: list[nn.Module] = [*qkv, *o, *gate_up, *down]
        panels = [lin for lin in linears if isinstance(lin, PanelLinear)]
        if len(panels) != len(linears) or any(lin.bias is not None for lin in panels[len(qkv) :]):
            return None
        qkv_bias: list[torch.Tensor] = [lin.bias for lin in panels[: len(qkv)] if lin.bias is not None]
        if len(qkv_bias) not in (0, len(qkv)):
            return None
        with_onednn = [lin.max_kernel_rows for lin in panels if lin.packed is not None]
        return cls(
            input_norms=[layer.input_layernorm.weight for layer in layers],
            qkv=[lin.panels for lin in panels[: len(qkv)]],
            qkv_bias=qkv_bias,
            o=[lin.panels for lin in panels[len(qkv) : 2 * len(qkv)]],
            post_norms=[layer.post_attention_layernorm.weight for layer in layers],
            gate_up=[lin.panels for lin in panels[2 * len(qkv) : 3 * len(qkv)]],
            down=[lin.panels for lin in panels[3 * len(qkv) :]],
            num_heads=attn[0].num_heads,
            intermediate=panels[-1].in_features,
            eps=model.config.rms_norm_eps,
            scale=attn[0].scale,
            max_rows=min(with_onednn) if with_onednn else None,
        )

    def takes(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        """Whether a step of ``num_tokens`` rows with this metadata runs here."""
        return (
            num_tokens > 0
            and meta.num_decode_tokens == num_tokens
            and isinstance(meta.backend, CpuPagedDecode)
            and (self.max_rows is None or num_tokens <= self.max_rows)
        )

    def __call__(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's embeddings x [B, hidden] through every layer: (the last layer's output, the
        residual stream before it), what the layer loop returns. x is the residual's storage."""
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out = torch.ops.scalellm_cpu.decode_layers(
            x,
            self.input_norms,
            self.qkv,
            self.qkv_bias,
            self.o,
            self.post_norms,
            self.gate_up,
            self.down,
            kv_cache,
            *rope,
            meta.slot_blocks,
            meta.slot_offsets,
            meta.decode_block_tables,
            meta.decode_context_lens,
            self.num_heads,
            self.intermediate,
            self.eps,
            self.scale,
        )
        return out, x
