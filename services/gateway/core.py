"""GatewayCore: what the HTTP and gRPC front ends share: keys, admission, preprocessing, routing,
and the gateway's metrics.

A front end authenticates (the caller's Tenant), opens a RequestScope (the tenant's limits, the
in-flight bound with its fair queue, the request's metrics), parses its wire format into a
GenerationSpec, and calls generate() (the request's model lane, tokenization, tpm, routing); the
rest is common.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.gateway.admission import ApiKeys, KeyRefused, ServedModel
from services.gateway.admission_queue import AdmissionQueue
from services.gateway.config import GatewayConfig
from services.gateway.models import ModelCatalog, ModelLane, SourceFor, parse_added
from services.gateway.request import ErrorKind, GatewayError, GenerationRequest, GenerationSpec
from services.gateway.routing import Route, WorkerSet, WorkerSource
from services.gateway.session import WorkerChannels
from services.gateway.streaming import Generation, start_generation
from services.gateway.tenants import ANONYMOUS, RateLimited, Tenant, TenantLimiter


class RequestScope:
    """One admitted request: its tenant's limits, a slot under the in-flight bound, its metrics.

    ``with`` refuses at once when the gateway is at its bound; ``async with`` waits in the fair
    admission queue (admission_queue.py) while it has room (--max-queued). Either way the
    tenant's limits are checked first (RateLimited: 429 with Retry-After)."""

    __slots__ = ("_core", "_share", "api", "received_at", "tenant")

    def __init__(self, core: GatewayCore, api: str, tenant: Tenant | None = None) -> None:
        self._core = core
        self.api = api
        self.tenant = tenant or ANONYMOUS
        self._share = self.tenant.share
        self.received_at = time.perf_counter()

    def __enter__(self) -> RequestScope:
        self._admit_tenant()
        if not self._core.admission.try_enter(self._share):
            self._core.limiter.release(self.tenant)
            raise self._overloaded()
        self._entered()
        return self

    async def __aenter__(self) -> RequestScope:
        self._admit_tenant()
        admission = self._core.admission
        try:
            if not admission.try_enter(self._share):
                if not admission.can_wait():
                    raise self._overloaded()
                self._core.metrics.queued.inc()
                try:
                    await admission.wait(self._share)
                finally:
                    self._core.metrics.queued.dec()
        except BaseException:
            self._core.limiter.release(self.tenant)
            raise
        self._entered()
        return self

    def _admit_tenant(self) -> None:
        core = self._core
        if core.draining:
            raise GatewayError(ErrorKind.UNAVAILABLE, "the gateway is shutting down", code="shutting_down")
        try:
            core.limiter.admit(self.tenant)
        except RateLimited as exc:
            core.metrics.rate_limited.labels(self.tenant.name, exc.limit).inc()
            raise

    def _overloaded(self) -> GatewayError:
        return GatewayError(
            ErrorKind.OVERLOADED,
            f"the gateway is at its bound of {self._core.config.max_inflight} requests in flight; retry later",
            code="too_many_requests",
            retry_after=1,
        )

    def _entered(self) -> None:
        metrics = self._core.metrics
        self._core.in_flight += 1
        metrics.in_flight.inc()
        metrics.tenant_requests.labels(self.tenant.name).inc()
        metrics.tenant_in_flight.labels(self.tenant.name).inc()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        core = self._core
        core.in_flight -= 1
        core.admission.leave()
        core.limiter.release(self.tenant)
        core.metrics.in_flight.dec()
        core.metrics.tenant_in_flight.labels(self.tenant.name).dec()
        core.metrics.e2e.labels(self.api).observe(time.perf_counter() - self.received_at)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class GatewayCore:
    """The gateway's shared request path over its models (models.py: a lane per model, the
    default one's tokenizer loaded now, the others' on first use) and their worker sources.

    ``model``, ``source``, ``router``, ``preprocessor`` and ``dispatcher`` are the default
    model's; ``source_for`` gives the workers of an --add-model name (the registry view)."""

    def __init__(
        self,
        config: GatewayConfig,
        model: ServedModel,
        source: WorkerSource,
        keys: ApiKeys | None = None,
        metrics: GatewayMetrics | None = None,
        source_for: SourceFor | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.source = source
        self.keys = keys or ApiKeys.disabled()
        self.metrics = metrics or GatewayMetrics()
        self.channels = WorkerChannels(config.security.load())
        parts = (self.channels, self.metrics)
        default = ModelLane(model.name, model.path, source, config, parts, served=model)
        self.catalog = ModelCatalog(default)
        added = parse_added(config.add_models)
        if added and source_for is None:
            raise ValueError("--add-model needs the registry (--kvstore): static workers name no model")
        for name, path in added:
            assert source_for is not None
            self.catalog.add(ModelLane(name, path, source_for(name), config, parts))
        self.router = default.router
        assert default.preprocessor is not None and default.dispatcher is not None
        self.preprocessor, self.dispatcher = default.preprocessor, default.dispatcher
        self.in_flight = 0
        self.admission = AdmissionQueue(config.max_inflight, config.max_queued)
        self.limiter = TenantLimiter()
        self.draining = False
        self.metrics.watch_workers(
            lambda: sum(len(x.decode) for x in self.worker_sets()),
            lambda: sum(len(x.prefill) for x in self.worker_sets()),
        )

    def worker_sets(self) -> tuple[WorkerSet, ...]:
        """Every model's workers now, the default model's first."""
        return tuple(lane.source.current() for lane in self.catalog.lanes.values())

    def can_serve(self) -> bool:
        """True while some model has a decode worker."""
        return any(workers.decode for workers in self.worker_sets())

    def lanes_for(self, tenant: Tenant) -> tuple[ModelLane, ...]:
        """The models a tenant may use (/v1/models, ListModels)."""
        return tuple(lane for lane in self.catalog.lanes.values() if tenant.may_use(lane.name))

    def find(self, name: str | None, tenant: Tenant) -> ModelLane:
        """A request's model; 404 model_not_found for one not served or not the tenant's to use."""
        lane = self.catalog.find(name)
        if not tenant.may_use(lane.name):
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"the model {name or lane.name!r} does not exist or tenant {tenant.name!r} may not use it",
                param="model",
                code="model_not_found",
            )
        return lane

    async def lane(self, name: str | None, tenant: Tenant) -> tuple[ModelLane, ServedModel]:
        """find(), with the model's tokenizer loaded."""
        lane = self.find(name, tenant)
        return lane, await lane.load()

    def model_of(self, request: GenerationRequest) -> ServedModel:
        """The loaded model a prepared request is for."""
        served = self.catalog.lanes[request.model].loaded
        assert served is not None, "a request is prepared only after its model is loaded"
        return served

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; GatewayError(UNAUTHENTICATED) when keys are on and this one is
        wrong (counted by reason, never with the key)."""
        try:
            return self.keys.lookup(authorization)
        except KeyRefused as exc:
            self.metrics.auth_failures.labels(exc.reason.value).inc()
            raise

    def scope(self, api: str, tenant: Tenant | None = None) -> RequestScope:
        """Admit a request (``async with core.scope("chat", tenant):``, or ``with`` to refuse at
        once at the bound); OVERLOADED past the in-flight bound or the tenant's limits."""
        return RequestScope(self, api, tenant)

    def record(self, api: str, exc: BaseException | None) -> None:
        """Count a finished request by outcome (also for requests refused before admission)."""
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, GatewayError):
            outcome = exc.kind.name.lower()
            self.metrics.errors.labels(api, outcome).inc()
        elif isinstance(exc, asyncio.CancelledError | ConnectionError):
            outcome = "cancelled"
        else:
            outcome = "internal"
            self.metrics.errors.labels(api, outcome).inc()
        self.metrics.requests.labels(api, outcome).inc()

    async def generate(
        self, spec: GenerationSpec, tenant: Tenant, received_at: float, timeout_s: float | None = None
    ) -> Generation:
        """Tokenize, check limits, route and open every choice; GatewayError on any failure."""
        lane, _ = await self.lane(spec.model, tenant)
        assert lane.preprocessor is not None and lane.dispatcher is not None
        request = await lane.preprocessor.prepare(spec, tenant.name, received_at)
        try:
            self.limiter.charge_tokens(tenant, request.budget_tokens)
        except RateLimited as exc:
            self.metrics.rate_limited.labels(tenant.name, exc.limit).inc()
            raise
        request = replace(request, tenant_weight=tenant.weight)
        salt = tenant.cache_salt(request.sampling.cache_salt)
        if salt != request.sampling.cache_salt:  # namespaced by tenant (tenants.py)
            request = replace(request, sampling=replace(request.sampling, cache_salt=salt))
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        return await start_generation(lane.dispatcher, request, timeout, self.metrics)

    def prune_channels(self) -> None:
        """Close channels to workers that left, drop their metric series (called when the worker
        set changes)."""
        sets = self.worker_sets()
        self.channels.prune({w.address for workers in sets for w in workers.decode})
        self.metrics.forget_workers(
            {w.worker_id for workers in sets for w in (*workers.decode, *workers.prefill)}
        )

    async def close(self) -> None:
        await self.channels.close()


# ---- metrics (own registry, so tests can run several gateways in-process) ------------------------


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Request counts and latencies as the gateway sees them (what a client would measure)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "scalellm_gateway_requests",
            "Requests answered, by API and outcome",
            ["api", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "scalellm_gateway_errors",
            "Requests that failed, by API and error kind",
            ["api", "kind"],
            registry=r,
        )
        self.in_flight = Gauge("scalellm_gateway_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram(
            "scalellm_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first token received from a decode worker",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "scalellm_gateway_time_per_output_token_seconds",
            "Per choice: (last token - first token) / (tokens - 1)",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "scalellm_gateway_request_seconds",
            "Arrival to the end of the answer",
            ["api"],
            buckets=_LATENCY,
            registry=r,
        )
        self.overhead = Histogram(
            "scalellm_gateway_overhead_seconds",
            "Per choice: time spent in the gateway itself (validation, tokenization, routing, detokenization)",
            buckets=_OVERHEAD,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "scalellm_gateway_prompt_tokens", "Prompt tokens sent to workers", registry=r
        )
        self.completion_tokens = Counter(
            "scalellm_gateway_completion_tokens", "Tokens generated for clients", registry=r
        )
        self.retries = Counter(
            "scalellm_gateway_route_retries",
            "Decode workers skipped after a failure, by status",
            ["code"],
            registry=r,
        )
        self.migrations = Counter(
            "scalellm_gateway_migrations",
            "Choices moved to another decode worker mid-stream, by what ended the first stream",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "scalellm_gateway_cancelled", "Decode streams cancelled early, by reason", ["reason"], registry=r
        )
        self.workers = Gauge("scalellm_gateway_workers", "Routable workers, by kind", ["kind"], registry=r)
        self.queued = Gauge(
            "scalellm_gateway_requests_queued", "Requests waiting for a slot (--max-queued)", registry=r
        )
        self.tenant_requests = Counter(
            "scalellm_gateway_tenant_requests", "Requests admitted, by tenant", ["tenant"], registry=r
        )
        self.tenant_in_flight = Gauge(
            "scalellm_gateway_tenant_requests_in_flight", "Requests being served, by tenant", ["tenant"],
            registry=r,
        )  # fmt: skip
        self.tenant_tokens = Counter(
            "scalellm_gateway_tenant_tokens",
            "Tokens by tenant and kind (prompt, completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            "scalellm_gateway_rate_limited",
            "Requests refused for a tenant limit, by tenant and limit (max_concurrency, rpm, tpm)",
            ["tenant", "limit"],
            registry=r,
        )
        by_route = ["worker", "prefill"]
        """worker: where the prompt is computed; prefill: local (the decode worker) or remote."""
        self.routes = Counter(
            "scalellm_gateway_routes",
            "Sequences started, by the worker computing the prompt and prefill local or remote",
            by_route,
            registry=r,
        )
        self.route_prompt_blocks = Counter(
            "scalellm_gateway_route_prompt_blocks",
            "Prompt blocks a prefix-cache hit could cover, by worker and prefill local or remote",
            by_route,
            registry=r,
        )
        self.route_cached_blocks = Counter(
            "scalellm_gateway_route_cached_blocks",
            "Of those, blocks routing found cached on the worker computing the prompt (prefix hits)",
            by_route,
            registry=r,
        )
        self.route_prompt_tokens = Counter(
            "scalellm_gateway_route_prompt_tokens",
            "Prompt tokens routed, by worker and prefill",
            by_route,
            registry=r,
        )
        self.route_cached_tokens = Counter(
            "scalellm_gateway_route_cached_tokens",
            "Of those, tokens routing found cached on the worker computing the prompt",
            by_route,
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "scalellm_gateway_cached_prompt_tokens",
            "Prompt tokens the decode worker reported as prefix-cache hits (usage), by decode worker",
            ["worker"],
            registry=r,
        )
        self._by_worker = (self.routes, self.route_prompt_blocks, self.route_cached_blocks,
                           self.route_prompt_tokens, self.route_cached_tokens)  # fmt: skip
        self._workers: set[str] = set()  # worker ids with series
        self.auth_failures = Counter(
            "scalellm_gateway_auth_failures",
            "Requests refused for their API key: missing, malformed or unknown (never the key itself)",
            ["reason"],
            registry=r,
        )

    def observe_route(self, route: Route, prompt_len: int) -> None:
        """Count one started sequence's routing decision and its prefix hit."""
        local = route.local_prefill
        worker = route.decode if local else route.prefill[0]
        labels = (worker.worker_id, "local" if local else "remote")
        self._workers.add(worker.worker_id)
        self.routes.labels(*labels).inc()
        self.route_prompt_blocks.labels(*labels).inc(route.prompt_blocks)
        self.route_cached_blocks.labels(*labels).inc(route.cached_blocks)
        self.route_prompt_tokens.labels(*labels).inc(prompt_len)
        self.route_cached_tokens.labels(*labels).inc(min(prompt_len, route.cached_blocks * worker.block_size))

    def observe_cached_prompt(self, worker_id: str, tokens: int) -> None:
        """Prompt tokens a decode worker reported as prefix-cache hits."""
        self._workers.add(worker_id)
        self.cached_prompt_tokens.labels(worker_id).inc(tokens)

    def forget_workers(self, live: Collection[str]) -> None:
        """Drop the per-worker series of workers that left. A worker's id is new with every start:
        an autoscaled mesh would otherwise add series for as long as the gateway runs."""
        for worker_id in self._workers.difference(live):
            for counter in self._by_worker:
                for prefill in ("local", "remote"):
                    counter.remove(worker_id, prefill)
            self.cached_prompt_tokens.remove(worker_id)
        self._workers.intersection_update(live)

    def watch_workers(self, decode: Callable[[], float], prefill: Callable[[], float]) -> None:
        """Report the routable worker counts at scrape time."""
        self.workers.labels("decode").set_function(decode)
        self.workers.labels("prefill").set_function(prefill)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
