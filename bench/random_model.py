"""A randomly initialised copy of a model folder: same config, tokenizer and chat template, new weights.

    python bench/random_model.py SRC_FOLDER DST_FOLDER [--seed 0] [--moe | --tiny]

--moe writes a Mixtral of MOE_SHAPE instead (8 experts, 2 per token) with SRC's vocabulary and
tokenizer: an MoE shape to measure where no MoE checkpoint can travel. --tiny shrinks SRC's
config to TINY_SHAPE (one layer, 64 wide, a 1024-token vocabulary): a model whose forward pass
costs next to nothing, so that a step's time is the engine's host work (bench/step_ab.py
--model); SRC's tokenizer is copied but yields ids past that vocabulary, so feed it token ids.

For measuring where the real weights cannot go (a GPU machine that reaches no model hub and takes
only small uploads): speed depends on the shapes, not on the values, and greedy parity with
transformers on the same random weights still checks that both compute the same function.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

# Everything in a model folder except its weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


MOE_SHAPE: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
)
"""Mixtral 8x7B's expert count, top-k and proportions (intermediate 3.5 x hidden, GQA 2:1) at a
quarter of its width and a quarter of its depth: with a 49152-token vocabulary about 0.83 B
parameters (3.3 GB in float32), 0.3 B active per token."""


TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)
"""A Llama with next to no arithmetic: what is left of a step is the host's."""


def random_like(src: Path, dst: Path, seed: int = 0, moe: bool = False, tiny: bool = False) -> Path:
    """Write a float32 checkpoint with src's config (or a Mixtral of MOE_SHAPE with src's
    vocabulary, or src's config at TINY_SHAPE) and fresh random weights, plus src's side files."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    if tiny:
        config.update(TINY_SHAPE)
    if moe:
        config = transformers.MixtralConfig(
            vocab_size=config.vocab_size,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=False,
            **MOE_SHAPE,
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for name in SIDE_FILES:
        if (src / name).is_file() and name != "config.json":  # save_pretrained wrote config.json
            shutil.copy(src / name, dst / name)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--moe", action="store_true", help="a Mixtral of MOE_SHAPE, src's vocabulary")
    shape.add_argument(
        "--tiny", action="store_true", help="src's config at TINY_SHAPE (host-cost benchmarks)"
    )
    args = parser.parse_args()
    print(random_like(args.src, args.dst, args.seed, args.moe, args.tiny))


if __name__ == "__main__":
    main()
