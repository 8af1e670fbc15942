"""KvstoreConfig: every setting of the kvstore, from flags with environment variable fallbacks.

Precedence: flag, then environment variable, then default. Nothing is read at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scalellm.registry.backend import with_password
from scalellm.security import SECURITY_OPTIONS, SecurityConfig, read_secret
from scalellm.settings import Option, nested, parse_config


@dataclass(frozen=True, slots=True, kw_only=True)
class KvstoreConfig:
    """Settings of one kvstore replica."""

    listen: str = "0.0.0.0:50070"
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    """redis://, rediss:// (TLS) or unix://, with an ACL user and password if Redis wants them."""
    redis_password_file: str | None = None
    """Redis's password, kept out of the URL (and out of `ps` and the environment)."""
    namespace: str = "scalellm"
    lease_s: float = 10.0
    reap_interval_s: float = 0.25
    metrics_host: str = ""
    """Where /metrics listens; empty: the host of --listen."""
    metrics_port: int = 9470
    grace_s: float = 1.0
    log_level: str = "INFO"
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if not 0 < self.reap_interval_s <= self.lease_s:
            raise ValueError(f"reap_interval_s must be in (0, lease_s], got {self.reap_interval_s}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        if not self.listen or not self.redis_url or not self.namespace:
            raise ValueError("listen, redis_url and namespace must not be empty")

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    def redis_connection_url(self) -> str:
        """The Redis URL with the password from --redis-password-file in it, when one is given."""
        if not self.redis_password_file:
            return self.redis_url
        return with_password(self.redis_url, read_secret(self.redis_password_file, "Redis password file"))

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> KvstoreConfig:
        """Parse flags (argv, default sys.argv[1:]) falling back to environ (default os.environ)."""
        return parse_config(
            cls,
            OPTIONS,
            argv,
            environ,
            prog="python -m services.kvstore",
            description="the kvstore placement registry",
        )


OPTIONS: tuple[Option, ...] = (
    Option(
        "--listen", "listen", str, "host:port for gRPC (port 0: any free port)", env="SCALELLM_KVSTORE_ADDR"
    ),
    Option("--redis-url", "redis_url", str, "Redis holding the registry state", env="SCALELLM_REDIS_URL"),
    Option(
        "--redis-password-file",
        "redis_password_file",
        str,
        "file holding Redis's password (mode 600 or 640)",
        env="SCALELLM_REDIS_PASSWORD_FILE",
    ),
    Option("--namespace", "namespace", str, "key prefix, to share one Redis", env="SCALELLM_REDIS_NAMESPACE"),
    Option("--lease-s", "lease_s", float, "lease length in seconds", env="SCALELLM_KVSTORE_LEASE_S"),
    Option(
        "--reap-interval-s",
        "reap_interval_s",
        float,
        "expiry scan period",
        env="SCALELLM_KVSTORE_REAP_INTERVAL_S",
    ),
    Option(
        "--metrics-host",
        "metrics_host",
        str,
        "Prometheus HTTP host (default: the --listen host)",
        env="SCALELLM_KVSTORE_METRICS_HOST",
    ),
    Option(
        "--metrics-port",
        "metrics_port",
        int,
        "Prometheus HTTP port (0: off)",
        env="SCALELLM_KVSTORE_METRICS_PORT",
    ),
    Option(
        "--grace-s", "grace_s", float, "how long SIGTERM lets calls finish", env="SCALELLM_KVSTORE_GRACE_S"
    ),
    Option("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR", env="SCALELLM_LOG_LEVEL"),
    *nested("security", SECURITY_OPTIONS),
)
