"""The sparse MLP of mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE).

Routing follows transformers step for step, so greedy output matches it in float32:

    logits = gate(x)                           [T, E]
    probs  = softmax(logits in float32)        [T, E]
    w, idx = topk(probs, k)                    [T, k]   (w /= w.sum() when norm_topk_prob)
    out[t] = sum over experts e in increasing order of  w[t, e] * expert_e(x[t])

The reference path (every device; the CPU path) groups the step's tokens by expert and runs
each hit expert once over its tokens (two matmuls and SiLU-and-mul), adding the weighted rows
back with ``index_add_``: experts in increasing order, as transformers adds them.

Expert weights are stacked per layer, ``gate_up [E, 2I, H]`` and ``down [E, H, I]``. A rank of a
tensor-parallel group holds rows ``[r * I/N, (r + 1) * I/N)`` of every expert (``[E, 2I/N, H]``,
``[E, H, I/N]``: its output is a partial sum); with expert parallelism it holds the experts
``[first_expert, first_expert + E/N)`` whole and adds nothing for the others. Either way the
caller all-reduces the partial sums (scalellm.models.parallel).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models.config import ModelConfig, MoeConfig
from scalellm.models.ops import LayerOps


class SparseMoeBlock(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        moe: MoeConfig,
        ops: LayerOps,
        shared: nn.Module | None,
        experts: range,
        rows: range | None = None,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.ops = ops
        self.experts = experts
        """The experts this module holds (all of them unless expert-parallel)."""
        self.rows = rows if rows is not None else range(moe.intermediate_size)
        """The rows of each expert's intermediate dimension it holds (all unless tensor-parallel)."""
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        inter, hidden = len(self.rows), cfg.hidden_size
        self.w_gate_up = nn.Parameter(torch.empty(len(experts), 2 * inter, hidden), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(len(experts), hidden, inter), requires_grad=False)
        self.shared_expert = shared
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared is not None else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts_forward(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def experts_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """On CUDA with triton: one grouped matmul per projection over every local expert
        (models/moe_triton.py; SCALELLM_MOE_KERNEL=torch keeps the reference). Else the reference."""
        if x.is_cuda and os.environ.get("SCALELLM_MOE_KERNEL", "triton") != "torch":
            from scalellm.models import moe_triton

            if moe_triton.AVAILABLE:
                return moe_triton.experts_forward(
                    x, weights, ids, self.w_gate_up, self.w_down, self.experts, self.moe.num_experts,
                    self.ops.silu_mul,
                )  # fmt: skip
        return self.reference_experts(x, weights, ids)

    def reference_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Group the (token, choice) pairs by expert, run each local expert over its tokens once.

        ids [T, k] --flatten, stable sort--> pairs grouped by expert: | e0 ... | e1 ... | ...
        pair p (in the flat order) is token p // k's choice p % k
        """
        k = self.moe.top_k
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.moe.num_experts).tolist()
        tokens = order // k
        pair_weights = weights.flatten()[order]
        out = torch.zeros_like(x)
        start = sum(counts[: self.experts.start])
        for local, expert in enumerate(self.experts):
            n = counts[expert]
            if n:
                rows = tokens[start : start + n]
                h = self.ops.silu_mul(F.linear(x[rows], self.w_gate_up[local]))
                h = F.linear(h, self.w_down[local]) * pair_weights[start : start + n, None]
                out.index_add_(0, rows, h)
            start += n
        return out


def expert_weight(name: str) -> tuple[str, int, str] | None:
    """A checkpoint's per-expert weight -> (the block's prefix, expert id, which), or None.

    ``layers.3.block_sparse_moe.experts.5.w1.weight`` (Mixtral: w1 gate, w3 up, w2 down) and
    ``layers.3.mlp.experts.5.gate_proj.weight`` (Qwen) -> ("layers.3.mlp", 5, "gate")."""
    parts = name.split(".")
    if len(parts) < 4 or parts[-4] != "experts" or parts[-1] != "weight":
        return None
    which = _EXPERT_PROJ.get(parts[-2])
    if which is None:
        return None
    return moe_prefix(".".join(parts[:-4])), int(parts[-3]), which


def moe_prefix(prefix: str) -> str:
    """Mixtral's ``block_sparse_moe`` is this model's ``mlp``."""
    return prefix.replace("block_sparse_moe", "mlp")


_EXPERT_PROJ = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def load_expert(block: SparseMoeBlock, expert: int, which: str, tensor: torch.Tensor) -> bool:
    """Copy one expert's projection into the stacked weights; False when another rank holds it."""
    if expert not in block.experts:
        return False
    local, rows, inter = expert - block.experts.start, block.rows, block.moe.intermediate_size
    hidden = block.w_down.shape[1]
    full = (hidden, inter) if which == "down" else (inter, hidden)
    if tuple(tensor.shape) != full:
        raise ValueError(f"expert {expert} {which}: checkpoint shape {tuple(tensor.shape)} != model {full}")
    if which == "down":  # this rank's rows of the intermediate dimension: down's input columns
        block.w_down.data[local].copy_(tensor[:, rows.start : rows.stop])
    else:
        dest = block.w_gate_up.data[local].narrow(0, 0 if which == "gate" else len(rows), len(rows))
        dest.copy_(tensor[rows.start : rows.stop])
    return True
