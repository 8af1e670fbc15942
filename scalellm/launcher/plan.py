"""What `scalellm up` runs: one ChildSpec per process, built from the config (no side effects
beyond picking free ports). Every service is started through its own entry point,
`python -m services.<name>`, with the same flags a user would type."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from scalellm.launcher import placement
from scalellm.launcher.config import UpConfig
from scalellm.launcher.redis_child import PASSWORD_ENV
from scalellm.redis_server import free_port
from scalellm.registry.backend import with_password
from scalellm.security import MeshToken

LOOPBACK = "127.0.0.1"


class Ready(Enum):
    """How the launcher knows a child is serving."""

    LINE = "line"
    """It prints `READY <address> ...` on stdout."""
    GRPC_HEALTH = "grpc-health"
    """Its gRPC health service reports `health_service` SERVING at `address`."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    ready: Ready = Ready.LINE
    address: str = ""
    """Known up front for GRPC_HEALTH children; LINE children report theirs."""
    health_service: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Added to the launcher's environment; secrets go here, never into argv (`ps` shows argv)."""
    metrics: str = ""
    """URL of the child's Prometheus endpoint, when it has one."""
    restart: bool = True
    """Restart it on the same command line when it exits once the mesh is up (within the
    launcher's restart budget); False: its exit stops the mesh."""
    cpus: tuple[int, ...] = ()
    """The CPU cores it runs on (`--pin-cpus`, launcher/placement.py); () any."""


def _module(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", name, *args)


@dataclass(frozen=True)
class Secrets:
    """What this run's children share: the mesh token and the private Redis's password."""

    mesh: dict[str, str] = field(repr=False)
    """SCALELLM_MESH_TOKEN for every child, or nothing when the user set the token (or its file)
    in the launcher's environment, which the children inherit."""
    redis_password: str = field(repr=False)

    @classmethod
    def for_run(cls, environ: Mapping[str, str]) -> Secrets:
        mine = environ.get("SCALELLM_MESH_TOKEN") or environ.get("SCALELLM_MESH_TOKEN_FILE")
        mesh = {} if mine else {"SCALELLM_MESH_TOKEN": MeshToken.generate().value}
        return cls(mesh, secrets.token_urlsafe(24))

    @property
    def generated_token(self) -> bool:
        return bool(self.mesh)


def redis_spec(password: str, port: int = 0) -> ChildSpec:
    """A private redis-server (RedisServer) behind a small supervisor that prints READY <url>;
    it requires ``password``. Port 0: a free one; the launcher restarts it on the port it got."""
    argv = _module("scalellm.launcher.redis_child", "--port", str(port))
    return ChildSpec("redis", argv, env={PASSWORD_ENV: password})


def redis_url_for(ready_url: str, password: str) -> str:
    """The private Redis's URL as the kvstore needs it (its READY line has no password)."""
    return with_password(ready_url, password)


def kvstore_spec(redis_url: str, port: Callable[[], int] = free_port) -> ChildSpec:
    """The kvstore; the Redis URL (which may hold a password) goes through the environment."""
    address, metrics_port = f"{LOOPBACK}:{port()}", port()
    argv = _module(
        "services.kvstore", "--listen", address, "--metrics-host", LOOPBACK, "--metrics-port", str(metrics_port),
    )  # fmt: skip
    return ChildSpec(
        "kvstore", argv, Ready.GRPC_HEALTH, address, health_service="scalellm.v1.Registry",
        env={"OMP_NUM_THREADS": "1", "SCALELLM_REDIS_URL": redis_url},
        metrics=f"http://{LOOPBACK}:{metrics_port}/metrics",
    )  # fmt: skip


@dataclass(frozen=True)
class WorkerRun:
    """What every worker of one `scalellm up` run shares."""

    config: UpConfig
    kvstore: str
    """The kvstore's address."""
    run_id: str
    """Unique per launcher run; the tail of each worker's id (e.g. decode-2-1a2b3c)."""
    cpu_share: Path | None = None
    """The file (worker/cpu_share.py, one slot per worker slot) through which the workers lend
    each other cores, when config.shares_cpus."""
    port: Callable[[], int] = free_port
    """Picks a free port (tests pass a counter)."""


def worker_specs(run: WorkerRun, model_dir: Path) -> list[ChildSpec]:
    """Prefill workers first, then decode (or colocated) workers, each with its share of cores;
    then each extra model's tiers (NAME-prefill-N, NAME-decode-N)."""
    config = run.config
    tiers = [("prefill", n) for n in range(1, config.prefill + 1)]
    tiers += [("decode", n) for n in range(1, config.decode + 1)]
    specs = [worker_spec(run, model_dir, tier, n) for tier, n in tiers]
    slot = config.max_prefill_workers + config.max_decode_workers
    for model in config.extra_models:
        for tier, count in (("prefill", model.prefill), ("decode", model.decode)):
            for n in range(1, count + 1):
                specs.append(worker_spec(run, Path(model.path), tier, n, model.name, slot))
                slot += 1
    return specs


def worker_spec(
    run: WorkerRun, model_dir: Path, tier: str, number: int, model_name: str | None = None,
    gpu_slot: int | None = None,
) -> ChildSpec:  # fmt: skip
    """Worker `<tier>-<number>` (tier: prefill or decode) of the first model, or
    `<model_name>-<tier>-<number>` of another one (registered under model_name). GPUs go
    round-robin over the slots of the largest mesh: prefill workers first, then decode workers
    (`scalellm up --autoscale` adds and removes workers by number, and each number keeps its
    GPU), then the other models' workers (gpu_slot)."""
    config = run.config
    threads = str(config.worker_threads())
    module, role_name = (
        ("services.prefill", "prefill") if tier == "prefill" else ("services.decode", "decode")
    )
    if tier == "decode" and config.colocated:
        role_name = "both"
    name = f"{model_name}-{tier}-{number}" if model_name else f"{tier}-{number}"
    metrics_port = run.port()
    argv = [
        "--role", role_name, "--model", str(model_dir), "--worker-id", f"{name}-{run.run_id}",
        "--listen", f"{LOOPBACK}:0", "--advertise-host", LOOPBACK, "--transfer-listen", f"{LOOPBACK}:0",
        "--kvstore", run.kvstore, "--metrics-port", str(metrics_port), "--num-threads", threads,
        "--device", config.device, "--dtype", config.dtype, "--drain-timeout", str(config.drain_timeout_s),
        "--quantization", config.quantization, "--kv-cache-dtype", config.kv_cache_dtype,
    ]  # fmt: skip
    argv += _optional(config, model_name)
    tp = config.tier_tp(tier)
    if tp > 1:
        argv += ["--tensor-parallel-size", str(tp)]
        if config.expert_parallel:
            argv += ["--expert-parallel", "on"]
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    slot = number - 1 if tier == "prefill" else config.max_prefill_workers + number - 1
    slot = slot if gpu_slot is None else gpu_slot
    if run.cpu_share is not None:
        argv += ["--cpu-share-file", str(run.cpu_share), "--cpu-share-slot", str(slot)]
    if config.gpus:
        env["CUDA_VISIBLE_DEVICES"] = config.gpus[slot % len(config.gpus)]
    metrics = f"http://{LOOPBACK}:{metrics_port}/metrics"
    argv_all = _module(module, *argv, *config.worker_args)
    cpus = placement.worker_cores(config, slot) if config.device != "cuda" else ()
    return ChildSpec(name, argv_all, env=env, metrics=metrics, cpus=cpus)


def planner_spec(
    config: UpConfig, kvstore: str, model: str, port: Callable[[], int] = free_port
) -> ChildSpec:
    """The planner service for `--autoscale`, planning this mesh's model within the tiers' limits;
    the launcher reads its desired counts from its /metrics."""
    metrics_port = port()
    argv = _module(
        "services.planner", "--listen", f"{LOOPBACK}:0", "--kvstore", kvstore, "--model", model,
        "--min-prefill", str(config.prefill), "--max-prefill", str(config.max_prefill_workers),
        "--min-decode", str(config.decode), "--max-decode", str(config.max_decode_workers),
        "--metrics-host", LOOPBACK, "--metrics-port", str(metrics_port), *config.planner_args,
    )  # fmt: skip
    return ChildSpec(
        "planner", argv, env={"OMP_NUM_THREADS": "1"}, metrics=f"http://{LOOPBACK}:{metrics_port}/metrics"
    )


def _optional(config: UpConfig, model_name: str | None = None) -> list[str]:
    flags = {
        "--served-model-name": model_name or config.served_model_name,
        "--num-kv-blocks": config.num_kv_blocks,
        "--kv-cache-gb": config.kv_cache_gb,
        "--max-num-seqs": config.max_num_seqs,
        "--max-model-len": config.max_model_len,
    }
    return [item for flag, value in flags.items() if value is not None for item in (flag, str(value))]


def gateway_spec(
    config: UpConfig, model_dir: Path, kvstore: str, ports: tuple[int, int] | None = None
) -> ChildSpec:
    """The gateway on the configured ports, or on ``ports`` (http, grpc): those its first
    process bound, so a restarted gateway is where clients were sent."""
    http_port, grpc_port = ports or (config.http_port, config.grpc_port)
    argv = [
        "--host", config.host, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--model", str(model_dir), "--kvstore", kvstore, "--grace-s", str(config.drain_timeout_s),
    ]  # fmt: skip
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    for model in config.extra_models:
        argv += ["--add-model", f"{model.name}={model.path}"]
    if config.tls_cert and config.tls_key:
        argv += ["--tls-cert", config.tls_cert, "--tls-key", config.tls_key]
    return ChildSpec(
        "gateway", _module("services.gateway", *argv, *config.gateway_args), env={"OMP_NUM_THREADS": "1"}
    )
