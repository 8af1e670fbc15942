"""Tensor parallelism inside the model: which slice of each weight a rank holds, and the
collectives that join the slices (Megatron's layout, as vLLM and nano-vllm use it).

    column-parallel (q/k/v, gate/up; the vocabulary of embed_tokens and lm_head):
        W [out, in] -> rank r holds rows [r * out/N, (r + 1) * out/N)   output: a slice
    row-parallel (o_proj, down_proj):
        W [out, in] -> rank r holds columns [r * in/N, ...)             output: a partial sum

    attention: heads split over ranks (q heads and K/V heads alike; N must divide both), so a
               rank's KV cache holds its K/V heads only; o_proj's partial sums are all-reduced
    MLP:       gate/up column-split, down row-split, one all-reduce
    MoE:       every expert's intermediate rows split over the ranks as a dense MLP's (gate/up
               column-, down row-split); or with expert parallelism whole experts placed on
               ranks (N must divide their count). Either way each rank routes every token, runs
               its part, and the partial sums join the one all-reduce
    embedding: a rank looks up the ids in its vocabulary slice, zeros elsewhere, all-reduced
               (exact: one non-zero term per row)
    lm_head:   each rank's logits for its vocabulary slice, all-gathered to [T, V] (exact)

Row-parallel sums are added in a different order than one matmul adds them, so TP=N is not
bit-identical to TP=1 (float rounding); greedy output agrees on well-separated logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalellm.models.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its tensor-parallel group; ``group`` is None at size 1."""

    rank: int = 0
    size: int = 1
    group: Any = None
    """A ProcessGroup (gloo on CPU, NCCL on CUDA), built directly by scalellm.engine.tp_ranks."""
    expert_parallel: bool = False
    """MoE experts placed whole on the ranks (E/N each) instead of every expert's intermediate
    rows split over them (EngineConfig.expert_parallel)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along ``dim`` in rank order ([T, n] -> [T, N * n])."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Rank 0: every rank's x concatenated along ``dim`` in rank order; the others: None
        (half the bytes of all_gather where only rank 0 needs the result)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [[torch.empty_like(x) for _ in range(self.size)]] if self.rank == 0 else []
        opts: Any = dist.GatherOptions()
        opts.rootRank = 0
        self.group.gather(parts, [x], opts).wait()
        return torch.cat(parts[0], dim=dim) if self.rank == 0 else None

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None) -> torch.Tensor:
        """Rank r receives ``parts[r]`` of rank 0's ``parts`` (None on the other ranks) into
        ``out``, which it returns (every part shaped as ``out``)."""
        if self.size == 1:
            assert parts is not None
            return out.copy_(parts[0])
        inputs = [[p.contiguous() for p in parts]] if parts is not None else []
        self.group.scatter([out], inputs, _root(0)).wait()
        return out

    def split(self, n: int) -> range:
        """This rank's slice of n rows (n divisible by the size: check_divisible says so first)."""
        per = n // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def expert_split(self, num_experts: int, intermediate: int) -> tuple[range, range]:
        """The experts this rank holds and the rows of each one's intermediate dimension:
        all experts and a 1/N row slice of each (tensor parallel), or 1/N of the experts whole
        (expert parallel)."""
        if self.expert_parallel:
            return self.split(num_experts), range(intermediate)
        return range(num_experts), self.split(intermediate)


SINGLE = TensorParallel()


def _root(rank: int) -> Any:
    opts: Any = dist.ScatterOptions()
    opts.rootRank = rank
    return opts


def check_divisible(cfg: ModelConfig, size: int, expert_parallel: bool = False) -> None:
    """Every split dimension must divide evenly over ``size`` ranks; a clear error otherwise."""
    dims = {
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.moe is not None:
        if expert_parallel:
            dims["num_experts (expert parallel)"] = cfg.moe.num_experts
        else:
            dims["moe_intermediate_size"] = cfg.moe.intermediate_size
        if cfg.moe.shared_expert_intermediate_size:
            dims["shared_expert_intermediate_size"] = cfg.moe.shared_expert_intermediate_size
    bad = [f"{name} {value}" for name, value in dims.items() if value % size]
    if bad:
        raise ValueError(
            f"tensor_parallel_size {size} must divide the model's {', '.join(bad)} "
            "(attention and the KV cache split by heads, MLPs and experts by rows, or experts by "
            "count with expert parallelism)"
        )


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + V/N) of the embedding; other ids look up zeros, and the
    all-reduce fills them in from the rank that holds them."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        rows = tp.split(vocab_size)
        self.start, self.tp = rows.start, tp
        self.weight = nn.Parameter(torch.empty(len(rows), hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
_ROW = ("o_proj", "down_proj")


def shard(name: str, tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor (experts are sliced by count, in models/moe.py;
    norms and routers are whole on every rank)."""
    if tp.size == 1:
        return tensor
    owner = name.split(".")[-2]
    if owner in _COLUMN:
        rows = tp.split(tensor.shape[0])
        return tensor[rows.start : rows.stop]
    if owner in _ROW and name.endswith(".weight"):
        cols = tp.split(tensor.shape[1])
        return tensor[:, cols.start : cols.stop]
    return tensor
