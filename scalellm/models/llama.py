"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) and its mixture-of-experts kin
(Mixtral, Qwen2-MoE, Qwen3-MoE: the MLP is models/moe.py's) over the paged KV cache.

Numerics follow Hugging Face transformers step for step (RMSNorm in float32, rope cos/sin from
float32 frequencies, the same residual order), which is what keeps greedy output identical.
q/k/v and gate/up projections are fused into one matmul each; rope tables are looked up once per
step and applied to q and k together, in place; the residual add rides with the next norm. The
elementwise ops come from a ``LayerOps`` (models/ops.py: torch's, or fused C++ on CPU) and on CPU
the linear layers run through our panel kernel or oneDNN (packed_linear), and a step of decodes
goes through every layer in one C++ call where the loader set a ``decode_stack``
(models/decode_stack.py: the same kernels in this loop's order). Under tensor parallelism each
rank builds its slice of every layer (models/parallel.py) and all-reduces attention's and the
MLP's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from scalellm.engine.attention import AttentionMetadata, paged_attention
from scalellm.models.config import ModelConfig, RopeConfig
from scalellm.models.moe import SparseMoeBlock, expert_weight, load_expert, moe_prefix
from scalellm.models.ops import LayerOps, TorchOps
from scalellm.models.packed_linear import PanelLinear
from scalellm.models.parallel import SINGLE, TensorParallel, VocabParallelEmbedding, shard

if TYPE_CHECKING:  # decode_stack builds on this module
    from scalellm.models.decode_stack import CpuDecodeStack

TORCH_OPS = TorchOps()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: LayerOps = TORCH_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of x, or of residual + x (stored into residual: see models/ops.py)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    """cos/sin tables for every position, computed once in float32 on the current default device;
    looked up once per step.

    transformers rotates ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = [-x2, x1]. The
    same products and sum, bit for bit, with the sign folded into the table: [x2, x1] * [-sin1, sin2].

    Not an nn.Module: the model's casts and re-allocation leave the tables alone, so the loader
    builds them once on the real device and allocates the rest of the model on the meta device
    (where these float ops would run torch's Python decompositions, whose first use imports
    torch._dynamo: seconds of every worker's start-up).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        freqs = torch.arange(max_positions).float()[:, None] * rope_inv_freq(rope, head_dim)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = head_dim // 2
        sin = emb.sin()
        self.cos = emb.cos()
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for the step's positions, in the model's dtype."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


class Attention(nn.Module):
    """This rank's heads (all of them at TP=1); o_proj's output is a partial sum at TP>1."""

    def __init__(self, cfg: ModelConfig, ops: LayerOps, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads = cfg.num_heads // tp.size, cfg.num_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q/k/v come out of one matmul as [T, Hq + 2 Hkv, D]; q and k are rotated in place there,
        and the K/V heads go to the cache as the view [T, 2, Hkv, D] of the same buffer.

            qkv [T, | q: Hq heads | k: Hkv | v: Hkv |, D]
                    '--- rope ---------'    '-- new_kv --'
        """
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(x.shape[0], hq + 2 * hkv, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qkv[:, :hq] = self.q_norm(qkv[:, :hq])
            qkv[:, hq : hq + hkv] = self.k_norm(qkv[:, hq : hq + hkv])
        self.ops.rope_(qkv[:, : hq + hkv], *rope)
        new_kv = qkv[:, hq:].unflatten(1, (2, hkv))
        return self.o_proj(paged_attention(qkv[:, :hq], new_kv, kv, meta, self.scale))


class MLP(nn.Module):
    """SwiGLU over this rank's rows of ``intermediate`` (all of them at TP=1)."""

    def __init__(self, hidden: int, intermediate: int, ops: LayerOps) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


def make_mlp(cfg: ModelConfig, layer: int, ops: LayerOps, tp: TensorParallel) -> nn.Module:
    """The layer's dense MLP, or its sparse MoE block (experts split over the TP ranks by rows,
    or by count with expert parallelism)."""
    moe = cfg.moe
    if moe is None or layer in moe.dense_layers:
        return MLP(cfg.hidden_size, cfg.intermediate_size // tp.size, ops)
    shared_size = moe.shared_expert_intermediate_size // tp.size
    shared = MLP(cfg.hidden_size, shared_size, ops) if shared_size else None
    experts, rows = tp.expert_split(moe.num_experts, moe.intermediate_size)
    return SparseMoeBlock(cfg, moe, ops, shared, experts, rows)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, layer: int = 0, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = make_mlp(cfg, layer, ops, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for the first layer, residual None);
        residual: the stream before it. Returns this layer's MLP output and the stream before it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.tp.all_reduce(self.self_attn(h, rope, kv, meta))
        h = self.post_attention_layernorm(h, residual)
        return self.tp.all_reduce(self.mlp(h)), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        ops: LayerOps = TORCH_OPS,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.embed_tokens: nn.Embedding | VocabParallelEmbedding = (
            # _weight: no random init (load_weights fills it; normal_ on meta imports torch._dynamo)
            nn.Embedding(
                cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
            )
            if tp.size == 1
            else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = rotary
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // tp.size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.decode_stack: CpuDecodeStack | None = None
        """Set by the loader where one covers this model (models/decode_stack.py)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Flattened tokens of one step -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        residual: torch.Tensor | None = None
        if self.decode_stack is not None and self.decode_stack.takes(x.shape[0], meta):
            x, residual = self.decode_stack(x, rope, kv_cache, meta)
        else:
            for i, layer in enumerate(self.layers):
                x, residual = layer(x, residual, rope, kv_cache[:, i], meta)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, vocab] logits (every rank's vocabulary slice, gathered, at TP>1): in float32 where
        lm_head is our panel kernel on a bfloat16 weight (its float32 sums as they are: rounded
        to bfloat16, logits between 16 and 32 are 0.125 apart and a near-tie becomes a tie that
        the argmax settles by token id), else in the model's dtype; the sampler widens them to
        float32 where it needs more than an argmax."""
        if isinstance(self.lm_head, PanelLinear) and hidden.dtype == torch.bfloat16:
            return self.tp.all_gather(self.lm_head.forward_float(hidden))
        return self.tp.all_gather(self.lm_head(hidden))

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors (this rank's slices), fusing q/k/v and gate/up and
        stacking each MoE layer's experts as they come."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        tie = self.config.tie_word_embeddings
        for hf_name, tensor in weights:
            name = moe_prefix(hf_name.removeprefix("model."))
            if "rotary_emb" in name or (name == "lm_head.weight" and tie):
                continue
            loaded.update(self._load_one(params, name, tensor))
        expected = {n for n in params if not (tie and n == "lm_head.weight")}
        missing = {n for n in expected if n not in loaded and not any(k.startswith(n + "[") for k in loaded)}
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:8]}")

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> list[str]:
        """Copy one checkpoint tensor in; returns the names (``name[part]`` for a fused or
        stacked part) it filled, none for an expert another rank holds."""
        expert = expert_weight(name)
        if expert is not None:
            prefix, index, which = expert
            block = self.get_submodule(prefix)
            if not isinstance(block, SparseMoeBlock):
                raise ValueError(f"unexpected expert weight {name!r}: layer {prefix} is dense")
            stacked = "w_down" if which == "down" else "w_gate_up"
            return (
                [f"{prefix}.{stacked}[{index}.{which}]"] if load_expert(block, index, which, tensor) else []
            )
        tensor = shard(name, tensor, self.tp)
        parts = name.split(".")
        cfg, size = self.config, self.tp.size
        q, kv = cfg.num_heads // size * cfg.head_dim, cfg.num_kv_heads // size * cfg.head_dim
        offsets = {"q_proj": 0, "k_proj": q, "v_proj": q + kv}
        offsets |= {"gate_proj": 0, "up_proj": tensor.shape[0]}
        if len(parts) < 2 or parts[-2] not in offsets:
            _copy(params, name, tensor)
            return [name]
        fused = "qkv_proj" if parts[-2] in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
        name, offset = ".".join([*parts[:-2], fused, parts[-1]]), offsets[parts[-2]]
        _copy(params, name, tensor, offset, tensor.shape[0])
        return [f"{name}[{offset}]"]


def _copy(
    params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor, offset: int = 0, size: int | None = None
) -> None:
    if name not in params:
        raise ValueError(f"unexpected weight {name!r} in checkpoint")
    param = params[name]
    dest = param.data if size is None else param.data.narrow(0, offset, size)
    if dest.shape != tensor.shape:
        raise ValueError(
            f"weight {name!r}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
