"""WorkerConfig: every setting of a prefill or decode worker, from flags with environment
variable fallbacks (flag, then SCALELLM_* variable, then default). Nothing is read at import.
The engine's settings are the engine's own EngineConfig (``config.engine``), not copies."""

from __future__ import annotations

import enum
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scalellm.engine.config import EngineConfig
from scalellm.registry import WorkerRole
from scalellm.security import SECURITY_OPTIONS, SecurityConfig
from scalellm.settings import Option, nested, parse_config
from scalellm.transfer import ChannelConfig

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


class PrefillFallback(enum.Enum):
    """What a decode worker does when every prefill worker it was given failed."""

    LOCAL = "local"
    """Recompute the prompt here."""
    FAIL = "fail"
    """Fail the request with UNAVAILABLE."""


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    role: WorkerRole
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine's settings; engine.model None is the prepared demo model."""
    served_model_name: str | None = None
    worker_id: str = ""
    listen: str = "0.0.0.0:0"
    advertise_host: str = ""
    """Host other services use to reach this worker (default: this host's name)."""
    transfer_listen: str = "0.0.0.0:0"
    """host:port of the KV transfer rendezvous (decode workers)."""
    kvstore: tuple[str, ...] = ()
    metrics_port: int = 0
    metrics_host: str = ""
    """Where /metrics listens; empty: the host of --listen."""
    # failure handling
    prefill_timeout_s: float = 60.0
    transfer_timeout_s: float = 30.0
    prefill_fallback: PrefillFallback = PrefillFallback.LOCAL
    drain_timeout_s: float = 30.0
    cpu_share_file: str = ""
    """A file of the launcher's through which CPU workers on one machine lend each other cores
    (worker/cpu_share.py); empty: this worker keeps its --num-threads."""
    cpu_share_slot: int = 0
    """This worker's byte in cpu_share_file."""
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role.name.lower()}-{uuid.uuid4().hex[:8]}")
        if self.prefill_timeout_s <= 0 or self.transfer_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")

    def advertised(self, port: int) -> str:
        host = self.advertise_host or socket.gethostname()
        return f"{host}:{port}"

    @property
    def listen_host(self) -> str:
        """The host of --listen, brackets removed ("" for none)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.listen_host or "0.0.0.0"

    def channel_config(self) -> ChannelConfig:
        """KV transfer tunables: blocking operations time out with transfer_timeout_s; gloo binds
        the advertised host (else the --listen host unless it is a wildcard); pairs are
        authenticated with the mesh token's transfer key when one is set."""
        listen = None if self.listen_host in _WILDCARDS else self.listen_host
        return ChannelConfig(
            op_timeout_s=self.transfer_timeout_s,
            device_host=self.advertise_host or listen,
            auth_key=self.security.load().transfer_key,
        )


def parse_on_off(text: str) -> bool:
    """on/off, true/false, yes/no or 1/0 (a flag's value or its environment variable)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")


def _option(flag: str, name: str, type_: Callable[[str], Any], help_: str, **kw: Any) -> Option:
    """SCALELLM_ + the flag's name: --num-threads reads SCALELLM_NUM_THREADS."""
    return Option(
        flag, name, type_, help_, env="SCALELLM_" + flag.lstrip("-").replace("-", "_").upper(), **kw
    )


def worker_options(roles: Sequence[WorkerRole]) -> tuple[Option, ...]:
    return (
        _option("--role", "role", WorkerRole.parse, "what this worker does", choices=tuple(roles)),
        _option("--model", "engine.model", str, "Hugging Face folder (default: the prepared demo model)"),
        _option("--served-model-name", "served_model_name", str, "name registered for routing"),
        _option("--worker-id", "worker_id", str, "registry id (default: role + random suffix)"),
        _option("--listen", "listen", str, "gRPC host:port (port 0: any free one)"),
        _option("--advertise-host", "advertise_host", str, "host others reach this worker at"),
        _option("--transfer-listen", "transfer_listen", str, "KV transfer rendezvous host:port (decode)"),
        _option("--kvstore", "kvstore", str, "kvstore address (repeatable or comma-separated)", repeat=True),
        _option("--metrics-port", "metrics_port", int, "Prometheus HTTP port (0: off)"),
        _option("--metrics-host", "metrics_host", str, "Prometheus HTTP host (default: the --listen host)"),
        _option("--dtype", "engine.dtype", str, "float32, bfloat16, float16 or auto"),
        _option("--device", "engine.device", str, "cpu, cuda, cuda:N or auto"),
        _option("--block-size", "engine.block_size", int, "tokens per KV block"),
        _option(
            "--num-kv-blocks", "engine.num_kv_blocks", int, "KV cache blocks (default: from --kv-cache-gb)"
        ),
        _option("--kv-cache-gb", "engine.kv_cache_gb", float, "KV cache size on CPU"),
        _option("--max-model-len", "engine.max_model_len", int, "context length limit"),
        _option("--max-num-seqs", "engine.max_num_seqs", int, "running batch limit"),
        _option("--max-num-batched-tokens", "engine.max_num_batched_tokens", int, "token budget of one step"),
        _option(
            "--max-prefill-tokens-with-decodes",
            "engine.max_prefill_tokens_with_decodes",
            int,
            "most prompt tokens in a step while requests decode (larger: throughput over ITL)",
        ),
        _option("--num-threads", "engine.num_threads", int, "torch threads (CPU)"),
        _option("--quantization", "engine.quantization", str, "weights: none, int8, w8a8 (CPU), fp8 (CUDA)"),
        _option(
            "--kv-cache-dtype", "engine.kv_cache_dtype", str, "KV cache: auto (the model's dtype) or int8"
        ),
        _option(
            "--tensor-parallel-size",
            "engine.tensor_parallel_size",
            int,
            "processes the model is split over (CPU, gloo)",
        ),
        _option(
            "--expert-parallel",
            "engine.expert_parallel",
            parse_on_off,
            "on: MoE experts placed whole on the ranks instead of each split over them",
        ),
        _option(
            "--cuda-graph-max-batch",
            "engine.cuda_graph_max_batch",
            int,
            "decode batches up to this size replay CUDA graphs (0: off; default 256 on CUDA)",
        ),
        _option(
            "--async-scheduling",
            "engine.async_scheduling",
            parse_on_off,
            "on: schedule and launch each step while the previous one runs on the device (GPU)",
        ),
        _option(
            "--num-speculative-tokens",
            "engine.num_speculative_tokens",
            int,
            "draft tokens per step by prompt lookup (0: off)",
        ),
        _option(
            "--prompt-lookup-min", "engine.prompt_lookup_min", int, "shortest n-gram looked up for drafts"
        ),
        _option(
            "--prompt-lookup-max", "engine.prompt_lookup_max", int, "longest n-gram looked up for drafts"
        ),
        _option(
            "--speculative-max-rows",
            "engine.speculative_max_rows",
            int,
            "drafts only while a step's decode rows stay within this many (default 6 CPU, 64 CUDA)",
        ),
        _option("--prefill-timeout", "prefill_timeout_s", float, "seconds a Prefill rpc may take"),
        _option("--transfer-timeout", "transfer_timeout_s", float, "seconds a KV transfer op may take"),
        _option(
            "--prefill-fallback",
            "prefill_fallback",
            PrefillFallback,
            "when every prefill worker failed",
            choices=tuple(PrefillFallback),
        ),
        _option("--drain-timeout", "drain_timeout_s", float, "seconds SIGTERM lets requests finish"),
        _option(
            "--cpu-share-file", "cpu_share_file", str, "share cores with the CPU workers using this file"
        ),
        _option("--cpu-share-slot", "cpu_share_slot", int, "this worker's slot in --cpu-share-file"),
        *nested("security", SECURITY_OPTIONS),
    )


def parse_worker_args(
    argv: Sequence[str] | None, roles: Sequence[WorkerRole], environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Flags, then SCALELLM_* variables, then defaults; the role defaults to roles[0]."""
    names = "/".join(r.name.lower() for r in roles)
    return parse_config(
        WorkerConfig, worker_options(roles), argv, environ, prog=f"scalellm {names} worker",
        description=f"ScaleLLM {names} worker", extra={"role": roles[0]},
    )  # fmt: skip
