"""UpConfig: every setting of `scalellm up`, validated once (the flags live in scalellm/cli.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from scalellm.worker.cpu_share import machine_cores


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelTiers:
    """A model served beside the first: `--model NAME=PATH[,prefill=N][,decode=N]`, its counts
    resolved (the global --prefill / --decode where the per-model form says nothing)."""

    name: str
    path: str
    prefill: int
    decode: int

    @classmethod
    def parse(cls, text: str, prefill: int, decode: int) -> ModelTiers:
        """``NAME=PATH`` or a bare ``PATH`` (named after its folder), then optional counts."""
        head, *counts = text.split(",")
        name, sep, path = head.partition("=")
        if not sep:
            name, path = os.path.basename(head.rstrip("/")), head
        tiers = {"prefill": prefill, "decode": decode}
        for item in counts:
            key, sep, value = item.partition("=")
            if key not in tiers or not sep or not value.isdigit():
                raise ValueError(f"--model {text!r}: expected NAME=PATH[,prefill=N][,decode=N]")
            tiers[key] = int(value)
        if not name or not path:
            raise ValueError(f"--model {text!r}: expected NAME=PATH[,prefill=N][,decode=N]")
        return cls(name=name, path=path, **tiers)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpConfig:
    """One local mesh: Redis, a kvstore, prefill and decode workers and a gateway."""

    model: str | None = None
    """Hugging Face folder; None: the demo model (prepared once, up front)."""
    served_model_name: str | None = None
    extra_models: tuple[ModelTiers, ...] = ()
    """Models served beside the first, each with its own prefill and decode tiers (workers
    `NAME-prefill-N`, `NAME-decode-N`); the gateway serves them all (--add-model)."""
    prefill: int = 1
    decode: int = 1
    colocated: bool = False
    """Run `decode` workers with role both and no prefill workers."""
    host: str = "127.0.0.1"
    """Where the gateway listens (workers, kvstore and Redis always bind 127.0.0.1)."""
    http_port: int = 8000
    grpc_port: int = 50051
    tls_cert: str | None = None
    """The gateway's certificate and key: HTTPS and gRPC over TLS (for --host beyond loopback)."""
    tls_key: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    """An existing Redis (its URL may hold a password); None: start a private redis-server."""
    threads_per_worker: int | None = None
    """torch threads per worker; None: divide this process's CPU cores between the workers."""
    pin_cpus: bool = False
    """Pin each worker to its own cores and the services to the rest (launcher/placement.py)."""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    """Worker weights: none, int8 (fp8 on CUDA); EngineConfig.quantization."""
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    """Ranks (processes) per worker (EngineConfig.tensor_parallel_size), both tiers unless
    prefill_tp / decode_tp say otherwise."""
    prefill_tp: int | None = None
    """Ranks per prefill worker (None: tensor_parallel_size)."""
    decode_tp: int | None = None
    """Ranks per decode (or colocated) worker (None: tensor_parallel_size). Any pair of sizes
    works: KV travels with all the model's heads and is re-sharded on each side."""
    expert_parallel: bool = False
    """MoE experts placed whole on a worker's ranks (EngineConfig.expert_parallel)."""
    gpus: tuple[str, ...] = ()
    """GPU ids handed out round-robin to workers through CUDA_VISIBLE_DEVICES."""
    num_kv_blocks: int | None = None
    kv_cache_gb: float | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    worker_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    startup_timeout_s: float = 300.0
    quiet: bool = False
    """Do not echo the children's output (it is still shown when one fails)."""
    max_restarts: int = 5
    """Restarts in a row of a child that keeps dying soon after it starts (launcher/restarts.py)
    before the mesh stops with an error; 0: any child's exit stops the mesh."""
    autoscale: bool = False
    """Run the planner against the mesh's registry: `prefill` and `decode` become the minimums."""
    max_prefill: int | None = None
    """Most prefill workers with autoscale (None: `prefill`, so the tier stays fixed)."""
    max_decode: int | None = None
    planner_args: tuple[str, ...] = ()
    """Planner policy flags (scalellm/planner/policy.py), e.g. --up-window-s=10."""

    def __post_init__(self) -> None:
        if self.decode < 1:
            raise ValueError(f"--decode must be >= 1, got {self.decode}")
        if self.colocated and self.prefill:
            raise ValueError("--colocated runs no prefill workers: drop --prefill")
        if not self.colocated and self.prefill < 1:
            raise ValueError(f"--prefill must be >= 1 (or use --colocated), got {self.prefill}")
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"--{name.replace('_', '-')} must be a port (0: any free one)")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError("--threads-per-worker must be >= 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.drain_timeout_s < 0 or self.startup_timeout_s <= 0:
            raise ValueError("--drain-timeout must be >= 0 and --startup-timeout > 0")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        for flag, size in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--prefill-tp", self.prefill_tp),
            ("--decode-tp", self.decode_tp),
        ):
            if size is not None and size < 1:
                raise ValueError(f"{flag} must be >= 1, got {size}")
        if self.colocated and self.prefill_tp is not None:
            raise ValueError(
                "--colocated runs no prefill workers: drop --prefill-tp (--decode-tp sizes them)"
            )
        self._check_autoscale()
        self._check_models()

    def _check_models(self) -> None:
        names = [m.name for m in self.extra_models]
        if len(set(names)) != len(names) or self.served_model_name in names:
            raise ValueError(f"each --model needs its own name, got {names}")
        for m in self.extra_models:
            if m.decode < 1 or (self.colocated and m.prefill) or (not self.colocated and m.prefill < 1):
                raise ValueError(f"--model {m.name}: needs decode >= 1 and prefill >= 1 (0 with --colocated)")
        if self.extra_models and self.autoscale:
            raise ValueError("--autoscale plans one model: give a single --model")

    def _check_autoscale(self) -> None:
        if not self.autoscale and (
            self.max_prefill is not None or self.max_decode is not None or self.planner_args
        ):
            raise ValueError("--max-prefill, --max-decode and --planner-arg need --autoscale")
        if self.colocated and self.max_prefill:
            raise ValueError("--colocated runs no prefill workers: drop --max-prefill")
        if self.max_prefill_workers < self.prefill or self.max_decode_workers < self.decode:
            raise ValueError("--max-prefill / --max-decode must be >= --prefill / --decode")

    @property
    def max_prefill_workers(self) -> int:
        """The most prefill workers this mesh runs (the fixed count without autoscale)."""
        return self.prefill if self.max_prefill is None else self.max_prefill

    @property
    def max_decode_workers(self) -> int:
        return self.decode if self.max_decode is None else self.max_decode

    @property
    def workers(self) -> int:
        """How many worker processes this mesh runs at most (cores are shared out for that many)."""
        return (
            self.max_prefill_workers
            + self.max_decode_workers
            + sum(m.prefill + m.decode for m in self.extra_models)
        )

    @property
    def all_prefill(self) -> int:
        """Prefill workers of every model (what the gateway must see before the mesh is up)."""
        return self.prefill + sum(m.prefill for m in self.extra_models)

    @property
    def all_decode(self) -> int:
        return self.decode + sum(m.decode for m in self.extra_models)

    def tier_tp(self, tier: str) -> int:
        """Ranks per worker of ``tier`` ("prefill" or "decode")."""
        size = self.prefill_tp if tier == "prefill" else self.decode_tp
        return size if size is not None else self.tensor_parallel_size

    @property
    def ranks(self) -> int:
        """Rank processes this mesh runs at most (every worker times its tier's size)."""
        prefill = self.max_prefill_workers + sum(m.prefill for m in self.extra_models)
        decode = self.max_decode_workers + sum(m.decode for m in self.extra_models)
        return prefill * self.tier_tp("prefill") + decode * self.tier_tp("decode")

    @property
    def shares_cpus(self) -> bool:
        """Whether the workers lend each other idle cores (worker/cpu_share.py): on CPU, with
        more than one worker of one rank each, neither pinned nor given threads by hand."""
        single_rank = self.tier_tp("prefill") == 1 and self.tier_tp("decode") == 1
        hand_placed = self.pin_cpus or self.threads_per_worker is not None
        return self.device != "cuda" and single_rank and not hand_placed and self.ranks > 1

    def worker_threads(self, cores: int | None = None) -> int:
        """torch threads for each rank of a worker (its --num-threads): the given number, else
        an even share of the cores over every rank of the mesh."""
        if self.threads_per_worker:
            return self.threads_per_worker
        cores = cores or machine_cores()
        return max(1, cores // self.ranks)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> UpConfig:
        """Build from the `scalellm up` flags (see scalellm/cli.py)."""
        base_prefill = args.prefill if args.prefill is not None else (0 if args.colocated else 1)
        given = args.model or []
        specs = [ModelTiers.parse(m, base_prefill, args.decode) for m in given]
        first = specs[0] if specs else None
        named = bool(given) and "=" in given[0].split(",")[0]  # a bare PATH keeps today's meaning
        return cls(
            model=first.path if first else None,
            served_model_name=first.name if first and named else args.served_model_name,
            extra_models=tuple(specs[1:]),
            prefill=first.prefill if first else base_prefill,
            decode=first.decode if first else args.decode,
            colocated=args.colocated,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            redis_url=args.redis_url,
            threads_per_worker=args.threads_per_worker,
            pin_cpus=args.pin_cpus,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            prefill_tp=args.prefill_tp,
            decode_tp=args.decode_tp,
            expert_parallel=args.expert_parallel,
            gpus=tuple(g.strip() for g in (args.gpus or "").split(",") if g.strip()),
            num_kv_blocks=args.num_kv_blocks,
            kv_cache_gb=args.kv_cache_gb,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            worker_args=tuple(args.worker_arg or ()),
            gateway_args=tuple(args.gateway_arg or ()),
            drain_timeout_s=args.drain_timeout,
            startup_timeout_s=args.startup_timeout,
            quiet=args.quiet,
            max_restarts=args.max_restarts,
            autoscale=args.autoscale,
            max_prefill=args.max_prefill,
            max_decode=args.max_decode,
            planner_args=tuple(args.planner_arg or ()),
        )
