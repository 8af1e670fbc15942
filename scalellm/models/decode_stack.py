"""A step of decodes through every decoder layer in one C++ call (CPU).

For a step whose rows are all decodes, ``LlamaForCausalLM.forward`` hands the layers to a
``CpuDecodeStack``: ``torch.ops.scalellm_cpu.decode_layers`` (engine/csrc/decode_stack.cpp) runs
the kernels the layer loop runs (fused norms, our panel linears, rope, the cache write, the paged
decode kernel) in the same order on the same values, so the bits are the layer loop's, without
the ~60 us a layer of module calls, dispatch and fresh tensors between them: one engine's
one-stream step of the demo model, with and without it in turns, 11.2 against 8.1 ms on two Zen 4
cores (docs/benchmarks.md). Steps with prefill chunks, and models or steps the composite does not
cover, run the layer loop.

``CpuDecodeStack.of`` builds one for a model it covers: dense Llama layers (Qwen3's q/k norms
included) on one rank, the fused C++ ops, every linear layer through the panel kernel (bfloat16
with a oneDNN copy for many rows: up to that many rows), every one through oneDNN
(``PackedLinear``, bfloat16 on AMX CPUs: the composite calls torch's ``mkldnn::_linear_pointwise``
as PackedLinear does) or every one W8A8 (``--quantization w8a8``: the C++ W8A8 kernel).
``takes`` then checks each step: decodes only, the C++ paged backend (an int8 cache has its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import nn

from scalellm.engine.attention import AttentionMetadata
from scalellm.engine.cpu_kernels import CpuFusedOps, CpuPagedDecode
from scalellm.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from scalellm.models.packed_linear import PackedLinear, PanelLinear
from scalellm.models.quant_linear import W8A8Linear


class LinearKind(IntEnum):
    """How the stack's linear weights are kept (csrc/decode_stack.cpp's LinearKind)."""

    PANELS = 0
    """PanelLinear: packed in panels for our kernel."""
    ONEDNN = 1
    """PackedLinear: reordered for oneDNN (bfloat16 on AMX CPUs)."""
    W8A8 = 2
    """W8A8Linear: int8 with a scale per output, through the W8A8 kernel."""


KINDS = {PanelLinear: LinearKind.PANELS, PackedLinear: LinearKind.ONEDNN, W8A8Linear: LinearKind.W8A8}


@dataclass(frozen=True)
class CpuDecodeStack:
    """The model's decoder weights as the composite takes them: one list per weight of a layer,
    layer by layer, and the linear layers' kind."""

    input_norms: list[torch.Tensor]
    qkv: list[torch.Tensor]
    """Each layer's fused q/k/v weight as its linear layer keeps it: packed in panels
    (PanelLinear.panels), reordered for oneDNN (PackedLinear.packed) or int8 (W8A8Linear.packed);
    o, gate_up, down alike."""
    qkv_bias: list[torch.Tensor]
    """Each layer's q/k/v bias, or none at all."""
    o: list[torch.Tensor]
    q_norms: list[torch.Tensor]
    """Each layer's q/k RMSNorm weights (Qwen3), or none at all; k_norms alike."""
    k_norms: list[torch.Tensor]
    post_norms: list[torch.Tensor]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    kind: LinearKind
    scales: list[torch.Tensor]
    """W8A8 only: each layer's weight scales, qkv, o, gate_up, down, layer after layer."""
    w8a8_path: int
    """W8A8 only: the kernel path its layers were given (cpu_kernels.CpuW8A8.path; 0: the best)."""
    num_heads: int
    intermediate: int
    eps: float
    scale: float
    max_rows: int | None
    """The most rows a step may have here (None: any): above it a bfloat16 layer runs oneDNN."""

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> CpuDecodeStack | None:
        """A stack for ``model``, or None where the composite does not compute what its layers do:
        more than one rank, a mixture of experts, torch's elementwise ops, linear layers
        other than all of one kind (PanelLinear, PackedLinear or W8A8Linear on the C++ kernel), a
        bias but on q/k/v."""
        layers = [layer for layer in model.layers if isinstance(layer, DecoderLayer)]
        if model.tp.size != 1 or not layers or len(layers) != len(model.layers):
            return None
        n = len(layers)
        attn = [layer.self_attn for layer in layers]
        dense = [layer.mlp for layer in layers if isinstance(layer.mlp, MLP)]
        if len(dense) != n:
            return None
        if not all(isinstance(layer.input_layernorm.ops, CpuFusedOps) for layer in layers):
            return None
        linears: list[nn.Module] = [
            *(a.qkv_proj for a in attn),
            *(a.o_proj for a in attn),
            *(m.gate_up_proj for m in dense),
            *(m.down_proj for m in dense),
        ]
        kinds = {KINDS.get(type(lin)) for lin in linears}
        kind = kinds.pop()
        if kinds or kind is None:
            return None
        weights = [_weight(lin) for lin in linears]
        w8a8 = [lin for lin in linears if isinstance(lin, W8A8Linear)]
        w8a8_path = 0
        if w8a8:
            paths = {getattr(lin.kernel, "path", None) for lin in w8a8}
            path = paths.pop() if len(paths) == 1 else None
            if not isinstance(path, int):
                return None  # kernels other than the C++ one, or several paths
            w8a8_path = path
        biases = [_bias(lin) for lin in linears]
        if any(b is not None for b in biases[n:]):
            return None
        qkv_bias = [b for b in biases[:n] if b is not None]
        if len(qkv_bias) not in (0, n):
            return None
        with_onednn = [
            lin.max_kernel_rows for lin in linears if isinstance(lin, PanelLinear) and lin.packed is not None
        ]
        q_norms: list[torch.Tensor] = [a.q_norm.weight for a in attn if a.q_norm is not None]
        k_norms: list[torch.Tensor] = [a.k_norm.weight for a in attn if a.k_norm is not None]
        if len(q_norms) not in (0, n) or len(k_norms) != len(q_norms):
            return None
        return cls(
            input_norms=[layer.input_layernorm.weight for layer in layers],
            qkv=weights[:n],
            qkv_bias=qkv_bias,
            o=weights[n : 2 * n],
            q_norms=q_norms,
            k_norms=k_norms,
            post_norms=[layer.post_attention_layernorm.weight for layer in layers],
            gate_up=weights[2 * n : 3 * n],
            down=weights[3 * n :],
            kind=kind,
            scales=[w8a8[i + k * n].scales for i in range(n) for k in range(4)] if w8a8 else [],
            w8a8_path=w8a8_path,
            num_heads=attn[0].num_heads,
            intermediate=model.config.intermediate_size,
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
            self.q_norms,
            self.k_norms,
            self.post_norms,
            self.gate_up,
            self.down,
            self.scales,
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
            int(self.kind),
            self.w8a8_path,
        )
        return out, x


def _weight(linear: nn.Module) -> torch.Tensor:
    """The weight of one of KINDS' layers as the composite takes it: panels (our kernel), oneDNN's
    reordered copy, int8."""
    if isinstance(linear, PanelLinear):
        return linear.panels
    assert isinstance(linear, (PackedLinear, W8A8Linear))
    return linear.packed


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return linear.bias if isinstance(linear, (PanelLinear, PackedLinear, W8A8Linear)) else None
