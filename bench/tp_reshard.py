"""What re-sharding KV costs a tensor-parallel worker: gather_kv (a TP prefill worker's push
copies its ranks' heads into one all-heads tensor) and scatter_kv (a TP decode worker hands each
rank its heads of the landed blocks), per prompt, on CPU over gloo.

    python bench/tp_reshard.py [--tp 2] [--blocks 32] [--repeats 15]

KV layout: Llama-3-8B's (32 layers, 8 K/V heads, head dim 128, block size 16, float32: 4 MiB a
block); the weights are a random model of that layout with a narrow hidden size (only the KV
shape matters here). 32 blocks = a 512-token prompt. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=256, num_hidden_layers=32, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, vocab_size=512, max_position_embeddings=4096,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
        engine = LLMEngine(
            EngineConfig(
                model=str(model), dtype="float32", num_kv_blocks=4 * args.blocks, block_size=16,
                tensor_parallel_size=args.tp,
            )
        )  # fmt: skip
        try:
            landing = engine.kv_landing()
            landing.copy_(torch.randn(landing.shape))
            blocks = list(range(1, 2 * args.blocks, 2))[: args.blocks]  # not one run: the worst case
            mib = args.blocks * landing[0].numel() * landing.element_size() / 2**20
            times: dict[str, list[float]] = {"scatter_kv": [], "gather_kv": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                engine.scatter_kv(blocks)
                times["scatter_kv"].append(time.perf_counter() - start)
                start = time.perf_counter()
                engine.gather_kv(blocks)
                times["gather_kv"].append(time.perf_counter() - start)
            assert torch.equal(engine.gather_kv(blocks), landing[blocks])
            print(f"TP={args.tp}, {args.blocks} blocks ({mib:.0f} MiB, all heads), {args.repeats} repeats")
            for name, values in times.items():
                med = statistics.median(values)
                print(f"  {name:10s} median {med * 1e3:7.1f} ms  {mib / 1024 / med:5.2f} GiB/s")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
