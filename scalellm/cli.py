"""The `scalellm` command line.

Each subcommand lives in the module that owns it and is imported only when it runs, so
`scalellm --help` is instant and a torch-free command never imports torch.

    scalellm model prepare            turn the demo GGUF into a Hugging Face folder, print its path
    scalellm generate PROMPT ...      offline generation with the engine (no mesh)
    scalellm serve SERVICE [ARGS]     run one tier: same as `python -m services.SERVICE [ARGS]`
    scalellm up [FLAGS]               the whole mesh as local processes, until Ctrl-C
    scalellm bench [FLAGS]            load an OpenAI-compatible endpoint, report TTFT/TPOT/throughput
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# The engine's choices (scalellm/engine/config.py), spelled here so `scalellm` stays torch-free.
QUANTIZATIONS = ("none", "int8", "w8a8", "fp8")
KV_CACHE_DTYPES = ("auto", "int8")


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from scalellm.models.prepare import prepare_demo_model

    path = prepare_demo_model(cache_dir=args.cache_dir, force=args.force)
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from scalellm.llm import run_generate_command

    return run_generate_command(args)


SERVICES = ("gateway", "prefill", "decode", "kvstore", "planner")


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"services.{args.service}.__main__")
    return int(module.main(args.service_args) or 0)


def _cmd_up(args: argparse.Namespace) -> int:
    from scalellm.launcher import UpConfig, run_up

    try:
        config = UpConfig.from_namespace(args)
    except ValueError as exc:
        args.parser.error(str(exc))
    return run_up(config)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent  # bench/ lives in the source checkout
    if not (root / "bench" / "serving" / "main.py").is_file():
        print("scalellm bench: needs the source checkout (bench/serving/ is not installed)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.serving.main import main as bench_main

    return bench_main(args.bench_args)


def _add_up_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up",
        help="run the whole mesh locally (Redis, kvstore, workers, gateway) until Ctrl-C",
        description="Start Redis, a kvstore, prefill and decode workers and a gateway as child "
        "processes; Ctrl-C or SIGTERM drains and stops them all. Everything binds 127.0.0.1 but the "
        "gateway's --host; internal calls carry a mesh token (SCALELLM_MESH_TOKEN, else a fresh one).",
    )
    add = up.add_argument
    add(
        "--model",
        action="append",
        default=None,
        help="Hugging Face folder (default: the demo model, prepared once); repeatable as "
        "NAME=PATH[,prefill=N][,decode=N]: each model gets its own tiers (docs/deploy.md)",
    )
    add("--served-model-name", default=None, help="public model name (default: the folder's name)")
    add("--prefill", type=int, default=None, help="prefill workers (default 1; 0 with --colocated)")
    add("--decode", type=int, default=1, help="decode workers (default 1)")
    add("--colocated", action="store_true", help="run --decode workers with role both, no prefill workers")
    add("--host", default="127.0.0.1", help="address the gateway binds (default 127.0.0.1)")
    add("--http-port", type=int, default=8000, help="gateway OpenAI HTTP port (0: any free one)")
    add("--grpc-port", type=int, default=50051, help="gateway gRPC port (0: any free one)")
    add("--tls-cert", default=None, help="gateway certificate (PEM): serve HTTPS and gRPC over TLS")
    add("--tls-key", default=None, help="the gateway certificate's private key (PEM, mode 600)")
    add("--redis-url", default=None, help="use this Redis instead of starting a private redis-server")
    add(
        "--threads-per-worker",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers, and an idle CPU worker lends its cores to the busy ones)",
    )
    add(
        "--pin-cpus",
        action="store_true",
        help="pin each worker's threads to cores of its own and the gateway and other services to "
        "the rest (CPU workers; with --threads-per-worker 1 on 2 cores: the model on core 0)",
    )
    add("--device", default="auto", help="worker device: cpu, cuda or auto")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add("--quantization", default="none", choices=QUANTIZATIONS, help="worker weights (fp8: CUDA)")
    add("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="worker KV cache")
    add("--tensor-parallel-size", type=int, default=1, help="processes (ranks) per worker, both tiers")
    add("--expert-parallel", action="store_true", help="MoE experts whole on a worker's ranks (TP > 1)")
    add(
        "--prefill-tp",
        type=int,
        default=None,
        help="ranks per prefill worker (default --tensor-parallel-size)",
    )
    add(
        "--decode-tp", type=int, default=None, help="ranks per decode worker (default --tensor-parallel-size)"
    )
    add("--gpus", default=None, help="comma-separated GPU ids handed to workers round-robin")
    add("--num-kv-blocks", type=int, default=None, help="KV cache blocks per worker")
    add("--kv-cache-gb", type=float, default=None, help="KV cache size per worker in GB")
    add("--max-num-seqs", type=int, default=None, help="running batch limit per worker")
    add("--max-model-len", type=int, default=None, help="context length limit")
    add("--worker-arg", action="append", metavar="ARG", help="extra worker flag: --worker-arg=--flag=value")
    add(
        "--gateway-arg", action="append", metavar="ARG", help="extra gateway flag: --gateway-arg=--flag=value"
    )
    add("--drain-timeout", type=float, default=30.0, help="seconds each tier may drain on stop")
    add("--startup-timeout", type=float, default=300.0, help="seconds to wait for the mesh to be ready")
    add("--quiet", action="store_true", help="do not echo the services' logs")
    add(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts in a row of a child that keeps dying before the mesh stops (0: none; default 5)",
    )
    add(
        "--autoscale",
        action="store_true",
        help="start and drain workers as the planner says (docs/planner.md)",
    )
    add(
        "--max-prefill",
        type=int,
        default=None,
        help="with --autoscale: most prefill workers (--prefill: least)",
    )
    add(
        "--max-decode", type=int, default=None, help="with --autoscale: most decode workers (--decode: least)"
    )
    add(
        "--planner-arg",
        action="append",
        metavar="ARG",
        help="planner policy flag: --planner-arg=--up-window-s=10",
    )
    up.set_defaults(func=_cmd_up, parser=up)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalellm", description="ScaleLLM mesh command line")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model folders")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser("prepare", help="prepare the demo model (SmolLM2-135M-Instruct) once")
    prep.add_argument("--cache-dir", default=None, help="where prepared models live (default: user cache)")
    prep.add_argument("--force", action="store_true", help="rebuild even if a prepared folder exists")
    prep.set_defaults(func=_cmd_model_prepare)

    gen = sub.add_parser("generate", help="generate offline with the engine alone")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared demo model)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    gen.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="weights (fp8: CUDA)")
    gen.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    gen.set_defaults(func=_cmd_generate)

    serve = sub.add_parser("serve", help="run one service of the mesh", add_help=False)
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("service_args", nargs=argparse.REMAINDER, help="the service's own flags")
    serve.set_defaults(func=_cmd_serve)

    _add_up_parser(sub)

    # prefix_chars="+": every flag after `bench` is passed through untouched to bench/serving/main.py
    bench = sub.add_parser(
        "bench", help="benchmark an OpenAI-compatible endpoint (scalellm bench --help)",
        add_help=False, prefix_chars="+",
    )  # fmt: skip
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
