"""Where a choice goes: the workers (a live registry view or static addresses) and the Router that
picks the decode worker and the prefill workers to use: by prefix (where the prompt's KV already
is, weighed against load in tokens of work: prefix.py says how) or by load alone (--routing load:
the least-loaded decode worker with KV room).

Routing reads `WorkerSource.current()` once per sequence; both sources answer from memory (the
registry source rebuilds its set only when the view's version changes), so no request ever waits
on Redis or the kvstore.

A worker's estimated load is its last reported queue (running + waiting) plus the change in this
gateway's own in-flight count on it since that report; free blocks likewise. So a burst spreads
over the workers before the next heartbeat, and a fresh report (which already counts our
requests) resets the correction. Static workers have no reports: their load is our in-flight count.

Its prefill backlog is counted the same way but with our own prompts replaced by what we know of
them: a worker reports a waiting request's whole prompt as backlog (its prefix-cache hit is only
found when the request is admitted), so a prefix holder would look busiest exactly when its
queue is cache hits, and lose the next request of the same prefix. So:

    backlog = max(0, reported - ours_full_at_report) + ours_uncached_now
              ^ other gateways' work (and recomputes)    ^ exact: what we sent, not yet prefilled
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from scalellm.registry import BlockIndex, WorkerRecord, WorkerRole, WorkerView
from services.gateway.prefix import (
    PrefixHashes,
    PrefixIndex,
    RoutingMode,
    RoutingPolicy,
    prefill_locally,
)
from services.gateway.request import ErrorKind, GatewayError


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEndpoint:
    """A worker as routing sees it. free_blocks None: unknown (static workers, no report yet)."""

    worker_id: str
    address: str
    role: WorkerRole
    block_size: int = 0
    running: int = 0
    waiting: int = 0
    free_blocks: int | None = None
    prefill_backlog_tokens: int = 0
    reported_at: float = 0.0  # the load report's time; a new value means a fresh report

    @classmethod
    def from_record(cls, record: WorkerRecord) -> WorkerEndpoint:
        info, load = record.info, record.load
        known = load.updated_at > 0
        return cls(
            worker_id=info.worker_id,
            address=info.grpc_address,
            role=info.role,
            block_size=info.kv_block_size,
            running=load.running,
            waiting=load.waiting,
            free_blocks=load.free_blocks if known else None,
            prefill_backlog_tokens=load.prefill_backlog_tokens,
            reported_at=load.updated_at,
        )

    @classmethod
    def parse_static(cls, spec: str, role: WorkerRole) -> WorkerEndpoint:
        """``host:port`` or ``id=host:port`` (the id defaults to the address)."""
        worker_id, sep, address = spec.partition("=")
        if not sep:
            worker_id, address = spec, spec
        if not address or ":" not in address:
            raise ValueError(f"worker address {spec!r} is not [id=]host:port")
        return cls(worker_id=worker_id, address=address, role=role)


@dataclass(frozen=True, slots=True)
class WorkerSet:
    """Decode-capable workers (DECODE, BOTH) and prefill workers (PREFILL) at one moment, and the
    registry's live index of the prefix blocks they hold (None: not known, e.g. static workers)."""

    decode: tuple[WorkerEndpoint, ...] = ()
    prefill: tuple[WorkerEndpoint, ...] = ()
    blocks: BlockIndex | None = None


class WorkerSource(Protocol):
    """Anything that can say which workers exist right now."""

    def current(self) -> WorkerSet: ...


class StaticWorkers:
    """Workers fixed by flags (--decode-addr, --prefill-addr): no kvstore, no load reports."""

    def __init__(self, decode: Sequence[str], prefill: Sequence[str] = ()) -> None:
        self._set = WorkerSet(
            decode=tuple(WorkerEndpoint.parse_static(a, WorkerRole.BOTH) for a in decode),
            prefill=tuple(WorkerEndpoint.parse_static(a, WorkerRole.PREFILL) for a in prefill),
        )

    def current(self) -> WorkerSet:
        return self._set


class RegistryWorkers:
    """Workers from the gateway's live WorkerView, optionally only those serving one model."""

    def __init__(self, view: WorkerView, model: str | None = None) -> None:
        self.view = view
        self._model = model
        self._version = -1
        self._set = WorkerSet()

    def current(self) -> WorkerSet:
        snapshot = self.view.snapshot()
        if snapshot.version != self._version:
            self._set = WorkerSet(
                decode=tuple(WorkerEndpoint.from_record(r) for r in snapshot.decode_workers(self._model)),
                prefill=tuple(
                    WorkerEndpoint.from_record(r)
                    for r in snapshot.prefill_workers(self._model)
                    if r.info.role is WorkerRole.PREFILL
                ),
                blocks=self.view.blocks,
            )
            self._version = snapshot.version
        return self._set


# ---- routing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where one sequence goes: a decode worker and its prefill workers, best first (empty: the
    decode worker prefills itself), and what routing saw (prefix routing; 0 under load routing)."""

    decode: WorkerEndpoint
    prefill: tuple[WorkerEndpoint, ...] = ()
    chain: tuple[int, ...] = ()
    """The prompt's block hashes (prefix routing): noted as on its workers once acquired."""
    prompt_blocks: int = 0
    """Prompt blocks a cache hit could cover (len(chain))."""
    decode_cached_blocks: int = 0
    """Of those, blocks the decode worker holds."""
    prefill_cached_blocks: int = 0
    """Of those, blocks the first prefill worker holds (0 when prefill is local)."""
    ahead_tokens: int = 0
    """Work queued where the prompt will be computed, in tokens (prefix.py's ahead())."""

    @property
    def local_prefill(self) -> bool:
        """True when the decode worker computes the prompt itself."""
        return not self.prefill

    @property
    def cached_blocks(self) -> int:
        """Prompt blocks cached where the prompt will be computed."""
        return self.decode_cached_blocks if self.local_prefill else self.prefill_cached_blocks


class _Tally:
    """This gateway's outstanding work on one worker, and its value when the last report came:
    sequences in flight, KV blocks they hold, prompt tokens to compute there and not yet
    prefilled (tokens), and the whole prompts of those sequences (prompts)."""

    __slots__ = ("base_blocks", "base_inflight", "base_prompts", "blocks", "inflight", "prompts", "reported_at",
                 "tokens")  # fmt: skip

    def __init__(self) -> None:
        self.inflight = self.blocks = self.tokens = self.prompts = 0
        self.base_inflight = self.base_blocks = self.base_prompts = 0
        self.reported_at = 0.0

    def sync(self, worker: WorkerEndpoint) -> None:
        if worker.reported_at != self.reported_at:
            self.reported_at = worker.reported_at
            self.base_inflight, self.base_blocks, self.base_prompts = self.inflight, self.blocks, self.prompts

    def load(self, worker: WorkerEndpoint) -> int:
        return max(0, worker.running + worker.waiting + self.inflight - self.base_inflight)

    def free_blocks(self, worker: WorkerEndpoint) -> int | None:
        if worker.free_blocks is None:
            return None
        return worker.free_blocks - (self.blocks - self.base_blocks)

    def backlog(self, worker: WorkerEndpoint) -> int:
        """Prompt tokens to compute there before ours: the report's, less our prompts it may
        have counted whole, plus our uncached tokens not yet prefilled (module docstring)."""
        return max(0, worker.prefill_backlog_tokens - self.base_prompts) + self.tokens


class RouteLease:
    """The in-flight count a Route holds; release() once the sequence ends (idempotent). The
    prompt's uncached tokens count as the computing worker's backlog until prefilled()."""

    __slots__ = ("_blocks", "_prompts", "_tallies", "_work", "route")

    def __init__(self, route: Route, tallies: list[_Tally], blocks: int, work: list[tuple[int, int]]) -> None:
        """work: per tally, (uncached tokens it computes, whole prompt tokens it may report)."""
        self.route = route
        self._tallies = tallies
        self._blocks = blocks
        self._work = work
        for tally, (tokens, prompt) in zip(tallies, work, strict=True):
            tally.inflight += 1
            tally.blocks += blocks
            tally.tokens += tokens
            tally.prompts += prompt

    def prefilled(self) -> None:
        """The first token came: the prompt is no longer anyone's backlog (idempotent)."""
        for tally, (tokens, prompt) in zip(self._tallies, self._work, strict=True):
            tally.tokens -= tokens
            tally.prompts -= prompt
        self._work = [(0, 0)] * len(self._tallies)

    def release(self) -> None:
        self.prefilled()
        for tally in self._tallies:
            tally.inflight -= 1
            tally.blocks -= self._blocks
        self._tallies, self._work = [], []


@dataclass(frozen=True, slots=True)
class _Score:
    """One candidate under prefix routing, in tokens (prefix.py)."""

    worker: WorkerEndpoint
    matched_blocks: int
    uncached: int
    ahead: int

    @property
    def cost(self) -> int:
        return self.uncached + self.ahead


class Router:
    """Routes sequences over a WorkerSource, by prefix (default) or by load (policy.mode)."""

    def __init__(
        self,
        source: WorkerSource,
        *,
        prefill_fallbacks: int = 2,
        colocate_below_tokens: int = 0,
        policy: RoutingPolicy | None = None,
    ) -> None:
        self.source = source
        self.prefill_fallbacks = prefill_fallbacks
        self.colocate_below_tokens = colocate_below_tokens
        """Load routing only: prompts shorter than this prefill on a BOTH worker."""
        self.policy = policy or RoutingPolicy()
        self.prefix = PrefixIndex(self.policy.prediction_ttl_s)
        self._tallies: dict[str, _Tally] = {}

    def _tally(self, worker: WorkerEndpoint) -> _Tally:
        tally = self._tallies.get(worker.worker_id)
        if tally is None:
            tally = self._tallies[worker.worker_id] = _Tally()
        tally.sync(worker)
        return tally

    def inflight(self, worker_id: str) -> int:
        """This gateway's sequences now running on a worker (tests, metrics)."""
        tally = self._tallies.get(worker_id)
        return tally.inflight if tally else 0

    def can_serve(self) -> bool:
        """True while at least one decode worker is known."""
        return bool(self.source.current().decode)

    def route(
        self,
        prompt_len: int,
        exclude: Collection[str] = (),
        *,
        prompt: Sequence[int] = (),
        cache_salt: str | None = None,
    ) -> Route | None:
        """The best route for a prompt (its token ids in prompt and its cache salt, for prefix
        routing), skipping decode workers in exclude (already tried).

        None when every decode worker is excluded; GatewayError(UNAVAILABLE) when there is none.
        """
        workers = self.source.current()
        if not workers.decode:
            raise GatewayError(ErrorKind.UNAVAILABLE, "no decode worker is available", code="no_workers")
        if len(self._tallies) > 64 + 4 * (len(workers.decode) + len(workers.prefill)):
            self._prune({w.worker_id for w in (*workers.decode, *workers.prefill)})
        if self.policy.mode is RoutingMode.LOAD:
            return self._route_by_load(workers, prompt_len, exclude)
        return self._route_by_prefix(workers, prompt_len, exclude, PrefixHashes(prompt, cache_salt))

    def _short(self, worker: WorkerEndpoint, prompt_len: int) -> int:
        """1 when the worker's reported free blocks cannot hold the prompt (reports may be stale:
        it is still tried, last), else 0."""
        free = self._tally(worker).free_blocks(worker)
        need = -(-prompt_len // worker.block_size) if worker.block_size else 0
        return 0 if free is None or free >= need else 1

    def _route_by_load(self, workers: WorkerSet, prompt_len: int, exclude: Collection[str]) -> Route | None:
        best: tuple[tuple[int, int, int], WorkerEndpoint] | None = None
        for worker in workers.decode:
            if worker.worker_id in exclude:
                continue
            tally = self._tally(worker)
            key = (self._short(worker, prompt_len), tally.load(worker), -(tally.free_blocks(worker) or 0))
            if best is None or key < best[0]:
                best = (key, worker)
        if best is None:
            return None
        decode = best[1]
        if decode.role is WorkerRole.BOTH and prompt_len < self.colocate_below_tokens:
            return Route(decode)
        prefill = sorted(workers.prefill, key=lambda w: self._tally(w).load(w))
        return Route(decode, tuple(prefill[: self.prefill_fallbacks]))

    def _score(
        self, worker: WorkerEndpoint, prompt_len: int, hashes: PrefixHashes, blocks: BlockIndex | None
    ) -> _Score:
        chain = hashes.of(worker.block_size)
        matched = self.prefix.matched_blocks(blocks, worker.worker_id, chain)
        tally = self._tally(worker)
        ahead = tally.backlog(worker) + self.policy.queue_weight_tokens * tally.load(worker)
        return _Score(worker, matched, prompt_len - matched * worker.block_size, ahead)

    def _route_by_prefix(
        self, workers: WorkerSet, prompt_len: int, exclude: Collection[str], hashes: PrefixHashes
    ) -> Route | None:
        best: tuple[tuple[int, int, int], _Score] | None = None
        for worker in workers.decode:
            if worker.worker_id in exclude:
                continue
            score = self._score(worker, prompt_len, hashes, workers.blocks)
            free = self._tally(worker).free_blocks(worker) or 0
            key = (self._short(worker, prompt_len), score.cost, -free)
            if best is None or key < best[0]:
                best = (key, score)
        if best is None:
            return None
        decode = best[1]
        prefill = sorted(
            (self._score(w, prompt_len, hashes, workers.blocks) for w in workers.prefill),
            key=lambda s: s.cost,
        )
        local = prefill_locally(
            self.policy,
            uncached_decode=decode.uncached,
            decode_cost=decode.cost,
            prefill_cost=prefill[0].cost if prefill else None,
        )
        chain = hashes.of(decode.worker.block_size)
        first = None if local else prefill[0]
        return Route(
            decode.worker,
            () if local else tuple(p.worker for p in prefill[: self.prefill_fallbacks]),
            chain=chain,
            prompt_blocks=len(chain),
            decode_cached_blocks=decode.matched_blocks,
            prefill_cached_blocks=first.matched_blocks if first else 0,
            ahead_tokens=first.ahead if first else decode.ahead,
        )

    def _prune(self, live: set[str]) -> None:
        for worker_id in [i for i, t in self._tallies.items() if i not in live and not t.inflight]:
            del self._tallies[worker_id]
        self.prefix.forget(live)

    def acquire(self, route: Route, prompt_len: int) -> RouteLease:
        """Count a sequence against its decode worker (and first prefill worker) until released,
        its uncached prompt tokens against the one computing it until prefilled; under prefix
        routing, note the prompt's blocks as soon to be on them."""
        decode = route.decode
        blocks = -(-prompt_len // decode.block_size) if decode.block_size else 0
        uncached = max(0, prompt_len - route.cached_blocks * decode.block_size)
        local = route.local_prefill
        tallies, work = [self._tally(decode)], [(uncached, prompt_len) if local else (0, 0)]
        self.prefix.predict(decode.worker_id, route.chain)
        if route.prefill:
            tallies.append(self._tally(route.prefill[0]))
            work.append((uncached, prompt_len))
            self.prefix.predict(route.prefill[0].worker_id, route.chain)
        return RouteLease(route, tallies, blocks, work)
