"""GatewayConfig: every setting of the gateway, from flags with SCALELLM_GATEWAY_* fallbacks.

Precedence: flag, then environment variable, then default. Nothing is read at import time.
Repeatable flags (--decode-addr, --prefill-addr, --kvstore) take comma-separated lists in env vars.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scalellm.security import SECURITY_OPTIONS, SecurityConfig, TlsFiles
from scalellm.settings import Option, nested, parse_config
from scalellm.text.reasoning import PARSERS as REASONING_PARSERS
from services.gateway.prefix import RoutingMode, RoutingPolicy

ENV_PREFIX = "SCALELLM_GATEWAY_"


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Settings of one gateway replica. Limits of 0 mean "the model's context length"."""

    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051
    model: str | None = None  # HF folder; None: the prepared demo model
    served_model_name: str | None = None  # default: the folder's name
    worker_model: str | None = None  # registry filter; None: served name; "*": any model
    add_models: tuple[str, ...] = ()
    """More models, NAME=PATH each: served under NAME, routed to workers registered as NAME."""
    kvstore: tuple[str, ...] = ()
    decode_addrs: tuple[str, ...] = ()
    prefill_addrs: tuple[str, ...] = ()
    api_keys_file: str | None = None
    tls_cert: str | None = None
    """Certificate chain (PEM) to serve HTTPS and gRPC over TLS with; needs tls_key."""
    tls_key: str | None = None
    max_prompt_tokens: int = 0
    max_total_tokens: int = 0
    max_payload_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_stop_strings: int = 8
    max_inflight: int = 1024
    max_queued: int = 0
    """Requests that wait for a slot past max_inflight, served fairly by tenant weight (0: 429 at once)."""
    route_attempts: int = 3
    migration_limit: int = 3
    """Times one choice may move to another decode worker mid-stream (0: never)."""
    prefill_fallbacks: int = 2
    colocate_below_tokens: int = 0
    """--routing load only (deprecated): prompts shorter than this prefill on a BOTH worker.
    Prefix routing decides per request instead (local_prefill_tokens, services/gateway/prefix.py)."""
    routing: RoutingMode = RoutingMode.PREFIX
    queue_weight_tokens: int = 128
    local_prefill_tokens: int = 256
    reasoning_parser: str | None = None
    """Chat answers' reasoning block as reasoning_content: deepseek_r1 or qwen3 (<think>), mistral
    ([THINK], special tokens: the text keeps special tokens then); vLLM's names,
    scalellm/text/reasoning.py. None: the answer's text as it is."""
    request_timeout_s: float = 600.0
    grace_s: float = 5.0
    event_loop: str = "uvloop"
    log_level: str = "INFO"
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """The mesh token and mesh TLS the gateway's calls to workers and the kvstore carry."""

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_n", "max_inflight", "route_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_prompt_tokens",
            "max_total_tokens",
            "max_stop_strings",
            "prefill_fallbacks",
            "migration_limit",
            "max_queued",
            "queue_weight_tokens",
            "local_prefill_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a port (0: any free one), got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.grace_s < 0:
            raise ValueError("request_timeout_s must be > 0 and grace_s >= 0")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(
                f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser!r}"
            )
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError(f"event_loop must be uvloop or asyncio, got {self.event_loop!r}")
        if self.kvstore and (self.decode_addrs or self.prefill_addrs):
            raise ValueError("give either --kvstore or static --decode-addr/--prefill-addr, not both")
        if self.add_models and (self.decode_addrs or self.worker_model == "*"):
            raise ValueError(
                "--add-model routes by the model workers register under: it needs --kvstore, not "
                "static --decode-addr, and no --worker-model '*'"
            )
        if self.prefill_addrs and not self.decode_addrs:
            raise ValueError("--prefill-addr needs at least one --decode-addr")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")

    @property
    def routing_policy(self) -> RoutingPolicy:
        """The Router's cost model."""
        return RoutingPolicy(
            mode=self.routing,
            queue_weight_tokens=self.queue_weight_tokens,
            local_prefill_tokens=self.local_prefill_tokens,
        )

    @property
    def tls(self) -> TlsFiles | None:
        """The public listeners' TLS identity, or None (plaintext)."""
        return TlsFiles(self.tls_cert, self.tls_key) if self.tls_cert and self.tls_key else None

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """Parse flags (argv, default sys.argv[1:]) falling back to environ (default os.environ)."""
        return parse_config(
            cls, OPTIONS, argv, environ, prog="python -m services.gateway", description="the mesh's gateway"
        )


def _option(flag: str, field: str, type_: Callable[[str], Any], help_: str, repeat: bool = False) -> Option:
    """SCALELLM_GATEWAY_ + the flag's name: --decode-addr reads SCALELLM_GATEWAY_DECODE_ADDR."""
    env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
    return Option(flag, field, type_, help_, env=env, repeat=repeat)


OPTIONS: tuple[Option, ...] = (
    _option("--host", "host", str, "address the HTTP and gRPC listeners bind"),
    _option("--http-port", "http_port", int, "OpenAI-compatible HTTP port (0: any free port)"),
    _option("--grpc-port", "grpc_port", int, "gRPC Gateway port (0: any free port)"),
    _option("--model", "model", str, "Hugging Face model folder (tokenizer, chat template, config)"),
    _option("--served-model-name", "served_model_name", str, "the model's public name"),
    _option("--worker-model", "worker_model", str, "model name workers register under ('*': any)"),
    _option("--add-model", "add_models", str, "another model, NAME=PATH (repeatable; lazily loaded)", True),
    _option("--kvstore", "kvstore", str, "kvstore address (repeatable or comma-separated)", True),
    _option("--decode-addr", "decode_addrs", str, "static decode worker [id=]host:port (repeatable)", True),
    _option(
        "--prefill-addr", "prefill_addrs", str, "static prefill worker [id=]host:port (repeatable)", True
    ),
    _option(
        "--api-keys-file",
        "api_keys_file",
        str,
        "'KEY TENANT [weight= max_concurrency= rpm= tpm= models=]' lines (mode 600)",
    ),
    _option("--tls-cert", "tls_cert", str, "certificate chain (PEM): serve HTTPS and gRPC over TLS"),
    _option("--tls-key", "tls_key", str, "its private key (PEM, mode 600 or 640)"),
    _option("--max-prompt-tokens", "max_prompt_tokens", int, "longest prompt (0: context length)"),
    _option("--max-total-tokens", "max_total_tokens", int, "prompt + max_tokens bound (0: context)"),
    _option("--max-payload-bytes", "max_payload_bytes", int, "largest request body / message"),
    _option("--max-n", "max_n", int, "most choices per request (n x prompts)"),
    _option("--max-stop-strings", "max_stop_strings", int, "most stop strings per request"),
    _option("--max-inflight", "max_inflight", int, "requests in flight before 429 / RESOURCE_EXHAUSTED"),
    _option("--max-queued", "max_queued", int, "requests waiting past --max-inflight, fair by tenant"),
    _option("--route-attempts", "route_attempts", int, "decode workers tried per sequence"),
    _option(
        "--migration-limit", "migration_limit", int, "moves of a stream to another decode worker mid-stream"
    ),
    _option("--prefill-fallbacks", "prefill_fallbacks", int, "prefill workers passed, best first"),
    _option(
        "--colocate-below-tokens",
        "colocate_below_tokens",
        int,
        "--routing load only (deprecated): shorter prompts skip prefill workers",
    ),
    _option("--routing", "routing", RoutingMode.parse, "prefix (KV cache affinity vs load) or load"),
    _option(
        "--queue-weight-tokens",
        "queue_weight_tokens",
        int,
        "prefix routing: tokens one queued sequence costs",
    ),
    _option(
        "--local-prefill-tokens",
        "local_prefill_tokens",
        int,
        "prefix routing: uncached prompt tokens a decode worker prefills itself",
    ),
    _option(
        "--reasoning-parser",
        "reasoning_parser",
        str,
        "deepseek_r1, qwen3 (<think>) or mistral ([THINK]): a chat answer's reasoning block goes to "
        "reasoning_content (and reasoning)",
    ),
    _option("--request-timeout-s", "request_timeout_s", float, "deadline of an HTTP request"),
    _option("--grace-s", "grace_s", float, "how long SIGTERM lets requests finish"),
    _option("--event-loop", "event_loop", str, "uvloop or asyncio"),
    _option("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    *nested("security", SECURITY_OPTIONS),
)
