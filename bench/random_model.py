"""A randomly initialised copy of a model folder: same config, tokenizer and chat template, new weights.

    python bench/random_model.py SRC_FOLDER DST_FOLDER [--seed 0]

For measuring where the real weights cannot go (a GPU machine that reaches no model hub and takes
only small uploads): speed depends on the shapes, not on the values, and greedy parity with
transformers on the same random weights still checks that both compute the same function.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Everything in a model folder except its weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def random_like(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write a float32 checkpoint with src's config and fresh random weights, plus src's side files."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
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
    args = parser.parse_args()
    print(random_like(args.src, args.dst, args.seed))


if __name__ == "__main__":
    main()
