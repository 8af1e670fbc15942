"""PlannerServiceConfig: the planner's policy (scalellm/planner/policy.py) plus where it reads the
registry and serves health and metrics, and the mesh security every service shares. Flag, then
SCALELLM_PLANNER_* variable (SCALELLM_MESH_* for the mesh security), then default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scalellm.planner import POLICY_OPTIONS, PlannerPolicy, Tier, TierLimits
from scalellm.planner.policy import planner_option
from scalellm.security import SECURITY_OPTIONS, SecurityConfig
from scalellm.settings import Option, nested, parse_config


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerServiceConfig(PlannerPolicy):
    """Settings of one planner (run one replica: a second one would only export the same counts)."""

    listen: str = "0.0.0.0:50080"
    """gRPC host:port of the standard health service (port 0: any free one)."""
    kvstore: tuple[str, ...] = ()
    model: str | None = None
    """Plan only this model (the name workers register under); None: every model in the registry."""
    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    metrics_host: str = ""
    """Where /metrics listens; empty: the host of --listen."""
    metrics_port: int = 9480
    log_level: str = "INFO"
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """The mesh token its registry calls carry and its gRPC server checks; mesh TLS both ways."""

    def __post_init__(self) -> None:
        super(PlannerServiceConfig, self).__post_init__()
        if not self.kvstore:
            raise ValueError("give --kvstore: the planner reads the registry through a kvstore")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        self.limits()  # refuses min > max

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    def limits(self) -> dict[Tier, TierLimits]:
        return {
            Tier.PREFILL: TierLimits(self.min_prefill, self.max_prefill),
            Tier.DECODE: TierLimits(self.min_decode, self.max_decode),
        }

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> PlannerServiceConfig:
        """Parse flags (argv, default sys.argv[1:]) falling back to environ (default os.environ)."""
        return parse_config(
            cls, OPTIONS, argv, environ, prog="python -m services.planner",
            description="the planner: desired worker counts from the registry's load reports",
        )  # fmt: skip


OPTIONS: tuple[Option, ...] = (
    planner_option("--listen", "listen", str, "gRPC health host:port (port 0: any free port)"),
    planner_option("--kvstore", "kvstore", str, "kvstore address (repeatable or comma-separated)", True),
    planner_option("--model", "model", str, "plan only this model (default: every model)"),
    planner_option("--min-prefill", "min_prefill", int, "fewest prefill workers per model"),
    planner_option("--max-prefill", "max_prefill", int, "most prefill workers per model (0: not planned)"),
    planner_option("--min-decode", "min_decode", int, "fewest decode workers per model"),
    planner_option("--max-decode", "max_decode", int, "most decode workers per model (0: not planned)"),
    planner_option("--metrics-host", "metrics_host", str, "Prometheus HTTP host (default: --listen host)"),
    planner_option("--metrics-port", "metrics_port", int, "Prometheus HTTP port (0: off)"),
    Option("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR", env="SCALELLM_LOG_LEVEL"),
    *POLICY_OPTIONS,
    *nested("security", SECURITY_OPTIONS),
)
