"""KvstoreConfig: every setting of the kvstore, from flags with environment variable fallbacks.

Precedence: flag, then environment variable, then default. Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class KvstoreConfig:
    """Settings of one kvstore replica."""

    listen: str = "0.0.0.0:50070"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "scalellm"
    lease_s: float = 10.0
    reap_interval_s: float = 0.25
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9470
    grace_s: float = 1.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if not 0 < self.reap_interval_s <= self.lease_s:
            raise ValueError(f"reap_interval_s must be in (0, lease_s], got {self.reap_interval_s}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        if not self.listen or not self.redis_url or not self.namespace:
            raise ValueError("listen, redis_url and namespace must not be empty")

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> KvstoreConfig:
        """Parse flags (argv, default sys.argv[1:]) falling back to environ (default os.environ)."""
        parser = build_parser()
        args = parser.parse_args(argv)
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(args, option.field)
            if value is None and option.env in env:
                try:
                    value = option.type(env[option.env])
                except ValueError:
                    parser.error(f"{option.env}={env[option.env]!r} is not a valid {option.type.__name__}")
            if value is not None:
                values[option.field] = value
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


@dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    field: str
    type: Callable[[str], Any]
    env: str
    help: str


OPTIONS: tuple[_Option, ...] = (
    _Option("--listen", "listen", str, "SCALELLM_KVSTORE_ADDR", "host:port for gRPC (port 0: any free port)"),
    _Option("--redis-url", "redis_url", str, "SCALELLM_REDIS_URL", "Redis holding the registry state"),
    _Option("--namespace", "namespace", str, "SCALELLM_REDIS_NAMESPACE", "key prefix, to share one Redis"),
    _Option("--lease-s", "lease_s", float, "SCALELLM_KVSTORE_LEASE_S", "lease length in seconds"),
    _Option(
        "--reap-interval-s",
        "reap_interval_s",
        float,
        "SCALELLM_KVSTORE_REAP_INTERVAL_S",
        "expiry scan period",
    ),
    _Option("--metrics-host", "metrics_host", str, "SCALELLM_KVSTORE_METRICS_HOST", "Prometheus HTTP host"),
    _Option(
        "--metrics-port",
        "metrics_port",
        int,
        "SCALELLM_KVSTORE_METRICS_PORT",
        "Prometheus HTTP port (0: off)",
    ),
    _Option("--grace-s", "grace_s", float, "SCALELLM_KVSTORE_GRACE_S", "how long SIGTERM lets calls finish"),
    _Option("--log-level", "log_level", str, "SCALELLM_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
)


def build_parser() -> argparse.ArgumentParser:
    """The kvstore's flags; every default is None so that env vars and dataclass defaults apply."""
    parser = argparse.ArgumentParser(
        prog="python -m services.kvstore", description="the kvstore placement registry"
    )
    defaults = {f.name: f.default for f in fields(KvstoreConfig)}
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=option.type,
            default=None,
            help=f"{option.help} (env {option.env}; default {defaults[option.field]})",
        )
    return parser
