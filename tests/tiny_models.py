"""Tiny random Llama-family checkpoints built at test time with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

TINY_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=10000.0, tie_word_embeddings=False),
    "llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=False),
    # head_dim 64: the size the CPU decode kernel has a vectorized path for (csrc/paged_decode.cpp)
    "mistral": dict(rope_theta=10000.0, sliding_window=None, head_dim=64),
    # Mixture-of-experts: 4 experts, 2 per token; Qwen's with a dense layer (mlp_only_layers)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        head_dim=32,
    ),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        norm_topk_prob=False,
        tie_word_embeddings=True,
    ),
}


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of ``family`` into out_dir (config + safetensors)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    }[family]
    config = config_cls(**TINY_COMMON, **FAMILIES[family])
    torch.manual_seed(seed)
    model = model_cls(config)
    # Larger-than-default weights make the logits spread out, so greedy argmax is well separated.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # 3-D: stacked MoE experts
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


CHAT_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def build_tiny_chat_model(demo_dir: Path, out_dir: Path, max_position_embeddings: int = 1024) -> Path:
    """A tiny random Llama with the demo model's vocabulary and tokenizer files, saved in out_dir:
    the gateway can serve it (tokenizer, chat template) and a worker runs it in milliseconds."""
    import transformers

    vocab = json.loads((demo_dir / "config.json").read_text())["vocab_size"]
    settings = {**TINY_COMMON, "vocab_size": vocab, "max_position_embeddings": max_position_embeddings}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings, tie_word_embeddings=True))
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in CHAT_TOKENIZER_FILES:
        if (demo_dir / name).is_file():
            shutil.copy(demo_dir / name, out_dir / name)
    return out_dir


def hf_greedy(
    model_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[list[int]]:
    """Reference greedy continuations from transformers, one prompt at a time (no padding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs
