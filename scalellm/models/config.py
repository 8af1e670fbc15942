"""The model's architecture, read from a Hugging Face ``config.json``.

Supports the Llama family: Llama 2/3 (llama3 and linear rope scaling), Mistral, Qwen2 (qkv bias),
Qwen3 (q/k RMSNorm) and SmolLM2, and the mixture-of-experts models Mixtral, Qwen2-MoE (a shared
expert behind a sigmoid gate) and Qwen3-MoE (``MoeConfig``). Both the old (``rope_theta`` / ``rope_scaling``) and the new
(``rope_parameters``) spellings of rope settings are understood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts model: a router picks ``top_k`` of ``num_experts``
    SwiGLU experts per token (softmax, then top-k, renormalised when ``norm_topk_prob``)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    """Each expert's intermediate size."""
    norm_topk_prob: bool
    """Renormalise the top-k probabilities to sum to one (always in Mixtral)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: a dense expert every token goes through, scaled by sigmoid(gate(x)); 0: none."""
    dense_layers: tuple[int, ...] = ()
    """Layers with a dense MLP (``intermediate_size``) instead (Qwen's mlp_only_layers and
    decoder_sparse_step)."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    """Bias on q, k and v projections (Qwen2; optional in Llama)."""
    qk_norm: bool
    """RMSNorm over each head of q and k before rope (Qwen3)."""
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    moe: MoeConfig | None = None
    """Set for mixture-of-experts models; None for dense ones."""

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + output) the model serves: its position table, and no more
        than its sliding window when it has one (nothing here implements sliding-window attention).
        The engine's max_model_len and the gateway's token limits both start from it."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model folder {model_dir} has no config.json")
        raw = json.loads(path.read_text())
        generation = Path(model_dir) / "generation_config.json"
        extra_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
        return cls.from_dict(raw, extra_eos=extra_eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], extra_eos: int | list[int] | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        sliding = raw.get("sliding_window")
        if family == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        if family in ("qwen3", "qwen2_moe", "qwen3_moe") and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(family, raw),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_ids(raw.get("eos_token_id")) + _as_ids(extra_eos),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            moe=_parse_moe(family, raw),
        )


def _attention_bias(family: str, raw: dict[str, Any]) -> bool:
    if family == "qwen2":
        return True
    if family == "qwen2_moe":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


def _parse_moe(family: str, raw: dict[str, Any]) -> MoeConfig | None:
    if family == "mixtral":
        return MoeConfig(
            num_experts=int(raw.get("num_local_experts", 8)),
            top_k=int(raw.get("num_experts_per_tok", 2)),
            intermediate_size=int(raw["intermediate_size"]),
            norm_topk_prob=True,
        )
    if family not in ("qwen2_moe", "qwen3_moe"):
        return None
    step = int(raw.get("decoder_sparse_step", 1))
    only = {int(i) for i in raw.get("mlp_only_layers") or ()}
    layers = range(int(raw["num_hidden_layers"]))
    return MoeConfig(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
        if family == "qwen2_moe"
        else 0,
        dense_layers=tuple(i for i in layers if i in only or step <= 0 or (i + 1) % step != 0),
    )


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(int(v) for v in value)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )
