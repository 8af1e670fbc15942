"""WorkerConfig: every setting of a prefill or decode worker, from flags with environment
variable fallbacks (flag, then SCALELLM_* variable, then default). Nothing is read at import."""

from __future__ import annotations

import argparse
import enum
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scalellm.registry import WorkerRole
from scalellm.transfer import ChannelConfig


class PrefillFallback(enum.Enum):
    """What a decode worker does when every prefill worker it was given failed."""

    LOCAL = "local"
    """Recompute the prompt here."""
    FAIL = "fail"
    """Fail the request with UNAVAILABLE."""


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    role: WorkerRole
    model: str | None = None
    """Hugging Face folder; None: the prepared demo model."""
    served_model_name: str | None = None
    worker_id: str = ""
    listen: str = "0.0.0.0:0"
    advertise_host: str = ""
    """Host other services use to reach this worker (default: this host's name)."""
    transfer_listen: str = "0.0.0.0:0"
    """host:port of the KV transfer rendezvous (decode workers)."""
    kvstore: tuple[str, ...] = ()
    metrics_port: int = 0
    # engine
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_gb: float = 2.0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_threads: int | None = None
    # failure handling
    prefill_timeout_s: float = 60.0
    transfer_timeout_s: float = 30.0
    prefill_fallback: PrefillFallback = PrefillFallback.LOCAL
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role.name.lower()}-{uuid.uuid4().hex[:8]}")
        if self.prefill_timeout_s <= 0 or self.transfer_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")

    def advertised(self, port: int) -> str:
        host = self.advertise_host or socket.gethostname()
        return f"{host}:{port}"

    def channel_config(self) -> ChannelConfig:
        """KV transfer tunables: blocking operations time out with transfer_timeout_s, and gloo
        binds the advertised host when one is set."""
        return ChannelConfig(op_timeout_s=self.transfer_timeout_s, device_host=self.advertise_host or None)


_ENV = "SCALELLM_"


def parse_worker_args(
    argv: Sequence[str] | None, roles: Sequence[WorkerRole], environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    env = os.environ if environ is None else environ

    def default(name: str, fallback: str | None = None) -> str | None:
        return env.get(_ENV + name, fallback)

    p = argparse.ArgumentParser(description=f"ScaleLLM {'/'.join(r.name.lower() for r in roles)} worker")
    p.add_argument(
        "--role", choices=[r.name.lower() for r in roles], default=default("ROLE", roles[0].name.lower())
    )
    p.add_argument("--model", default=default("MODEL"), help="HF folder (default: prepared demo model)")
    p.add_argument("--served-model-name", default=default("SERVED_MODEL_NAME"))
    p.add_argument("--worker-id", default=default("WORKER_ID", ""))
    p.add_argument("--listen", default=default("LISTEN", "0.0.0.0:0"), help="gRPC host:port (port 0: any)")
    p.add_argument("--advertise-host", default=default("ADVERTISE_HOST", ""))
    p.add_argument("--transfer-listen", default=default("TRANSFER_LISTEN", "0.0.0.0:0"))
    p.add_argument("--kvstore", default=default("KVSTORE", ""), help="comma-separated kvstore addresses")
    p.add_argument("--metrics-port", type=int, default=int(default("METRICS_PORT", "0") or 0))
    p.add_argument("--dtype", default=default("DTYPE", "auto"))
    p.add_argument("--device", default=default("DEVICE", "auto"))
    p.add_argument("--block-size", type=int, default=int(default("BLOCK_SIZE", "16") or 16))
    p.add_argument("--num-kv-blocks", type=int, default=_opt_int(default("NUM_KV_BLOCKS")))
    p.add_argument("--kv-cache-gb", type=float, default=float(default("KV_CACHE_GB", "2.0") or 2.0))
    p.add_argument("--max-model-len", type=int, default=_opt_int(default("MAX_MODEL_LEN")))
    p.add_argument("--max-num-seqs", type=int, default=int(default("MAX_NUM_SEQS", "64") or 64))
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=int(default("MAX_NUM_BATCHED_TOKENS", "2048") or 2048)
    )
    p.add_argument("--num-threads", type=int, default=_opt_int(default("NUM_THREADS")))
    p.add_argument("--prefill-timeout", type=float, default=float(default("PREFILL_TIMEOUT", "60") or 60))
    p.add_argument("--transfer-timeout", type=float, default=float(default("TRANSFER_TIMEOUT", "30") or 30))
    p.add_argument(
        "--prefill-fallback",
        choices=[f.value for f in PrefillFallback],
        default=default("PREFILL_FALLBACK", "local"),
    )
    p.add_argument("--drain-timeout", type=float, default=float(default("DRAIN_TIMEOUT", "30") or 30))
    a = p.parse_args(argv)
    try:
        return WorkerConfig(
            role=WorkerRole.parse(a.role),
            model=a.model,
            served_model_name=a.served_model_name,
            worker_id=a.worker_id,
            listen=a.listen,
            advertise_host=a.advertise_host,
            transfer_listen=a.transfer_listen,
            kvstore=tuple(x.strip() for x in a.kvstore.split(",") if x.strip()),
            metrics_port=a.metrics_port,
            dtype=a.dtype,
            device=a.device,
            block_size=a.block_size,
            num_kv_blocks=a.num_kv_blocks,
            kv_cache_gb=a.kv_cache_gb,
            max_model_len=a.max_model_len,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            num_threads=a.num_threads,
            prefill_timeout_s=a.prefill_timeout,
            transfer_timeout_s=a.transfer_timeout,
            prefill_fallback=PrefillFallback(a.prefill_fallback),
            drain_timeout_s=a.drain_timeout,
        )
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


def _opt_int(text: str | None) -> int | None:
    return int(text) if text else None
