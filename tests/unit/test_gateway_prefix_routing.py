"""Prefix routing with a real Router over a fixed worker set and a real BlockIndex: the prefix
holder wins until it is overloaded, predictions bridge the report lag, and local vs remote
prefill follows uncached tokens and the prefill tier's queue."""

from __future__ import annotations

from scalellm.kvhash import prompt_block_hashes
from scalellm.registry import BlockIndex, EventType, WorkerBlocks, WorkerEvent, WorkerRole
from services.gateway.prefix import PrefixIndex, RoutingMode, RoutingPolicy
from services.gateway.routing import Router, WorkerEndpoint, WorkerSet

BS = 16
SYSTEM = list(range(1000, 1640))  # 640 tokens: 40 blocks
PROMPT = SYSTEM + list(range(20))


class FixedSource:
    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers

    def current(self) -> WorkerSet:
        return self.workers


def ep(wid: str, role: WorkerRole = WorkerRole.BOTH, **load: int) -> WorkerEndpoint:
    fields = {"free_blocks": 1000, "reported_at": 1} | load
    return WorkerEndpoint(worker_id=wid, address=f"{wid}:1", role=role, block_size=BS, **fields)  # type: ignore[arg-type]


def index(**held: list[int]) -> BlockIndex:
    """Each worker holding every full block of its token list."""
    blocks = BlockIndex()
    snapshot = tuple(
        WorkerBlocks(w, tuple(prompt_block_hashes([*tokens, 0], BS))) for w, tokens in held.items()
    )
    blocks.apply(WorkerEvent(type=EventType.SNAPSHOT, snapshot_blocks=snapshot))
    return blocks


def router(
    decode: list[WorkerEndpoint],
    prefill: list[WorkerEndpoint] = [],  # noqa: B006 - never mutated
    blocks: BlockIndex | None = None,
    **policy: object,
) -> Router:
    source = FixedSource(WorkerSet(tuple(decode), tuple(prefill), blocks))
    return Router(source, policy=RoutingPolicy(**policy))  # type: ignore[arg-type]


def test_the_worker_holding_the_prefix_wins_over_a_less_loaded_one() -> None:
    r = router([ep("a"), ep("b", running=2)], blocks=index(b=PROMPT))
    route = r.route(len(PROMPT), prompt=PROMPT)
    assert route.decode.worker_id == "b" and route.local_prefill
    assert (route.prompt_blocks, route.decode_cached_blocks) == (41, 41)
    # Load routing ignores it.
    load = router([ep("a"), ep("b", running=2)], blocks=index(b=PROMPT), mode=RoutingMode.LOAD)
    assert load.route(len(PROMPT), prompt=PROMPT).decode.worker_id == "a"


def test_an_overloaded_prefix_holder_loses() -> None:
    # b saves 656 tokens of prefill but runs 6 sequences more: 6 * 128 = 768 tokens of work.
    r = router([ep("a"), ep("b", running=6)], blocks=index(b=PROMPT))
    assert r.route(len(PROMPT), prompt=PROMPT).decode.worker_id == "a"
    r = router([ep("a"), ep("b", running=4)], blocks=index(b=PROMPT))
    assert r.route(len(PROMPT), prompt=PROMPT).decode.worker_id == "b"
    # A prefill backlog counts too.
    r = router([ep("a"), ep("b", prefill_backlog_tokens=2000)], blocks=index(b=PROMPT))
    assert r.route(len(PROMPT), prompt=PROMPT).decode.worker_id == "a"


def test_only_the_matching_prefix_counts() -> None:
    other = list(range(5000, 5640)) + list(range(20))  # same tail, another head: the chain breaks at once
    r = router([ep("a"), ep("b", running=1)], blocks=index(b=other))
    route = r.route(len(PROMPT), prompt=PROMPT)
    assert route.decode.worker_id == "a" and route.decode_cached_blocks == 0


def test_a_routed_prompt_is_predicted_on_its_worker_until_reports_come() -> None:
    r = router([ep("a"), ep("b")], blocks=BlockIndex())
    first = r.route(len(PROMPT), prompt=PROMPT)
    lease = r.acquire(first, len(PROMPT))
    lease.release()
    second = PROMPT + list(range(300, 340))  # the next turn: the same history, longer
    route = r.route(len(second), prompt=second)
    assert route.decode.worker_id == first.decode.worker_id and route.decode_cached_blocks == 41


def test_predictions_expire() -> None:
    now = [0.0]
    prefix = PrefixIndex(ttl_s=5.0, clock=lambda: now[0])
    chain = prompt_block_hashes(PROMPT, BS)
    prefix.predict("a", chain)
    assert prefix.matched_blocks(None, "a", chain) == 41
    now[0] = 6.0
    assert prefix.matched_blocks(None, "a", chain) == 0
    prefix.predict("a", chain[:3])
    assert prefix.matched_blocks(index(a=PROMPT), "a", chain) == 41  # published or predicted
    prefix.forget(set())
    assert prefix.matched_blocks(None, "a", chain) == 0


def test_short_or_cached_prompts_prefill_locally_long_new_ones_remotely() -> None:
    decode = [ep("d", WorkerRole.DECODE)]
    prefill = [ep("p", WorkerRole.PREFILL)]
    r = router(decode, prefill, blocks=index(d=SYSTEM))
    assert r.route(100, prompt=list(range(100))).local_prefill  # short
    long_new = list(range(7000, 8000))
    route = r.route(len(long_new), prompt=long_new)
    assert [p.worker_id for p in route.prefill] == ["p"] and route.prefill_cached_blocks == 0
    cached = r.route(len(PROMPT), prompt=PROMPT)  # 660 tokens, 640 of them cached on d
    assert cached.local_prefill and cached.cached_blocks == 40


def test_a_busy_prefill_tier_keeps_long_prompts_local_and_a_busy_decoder_sends_them_away() -> None:
    long_new = list(range(7000, 8000))
    busy_prefill = router(
        [ep("d", WorkerRole.DECODE)], [ep("p", WorkerRole.PREFILL, prefill_backlog_tokens=4000)]
    )
    assert busy_prefill.route(len(long_new), prompt=long_new).local_prefill
    busy_both = router(
        [ep("d", WorkerRole.DECODE, running=40)],
        [ep("p", WorkerRole.PREFILL, prefill_backlog_tokens=4000)],
    )
    assert not busy_both.route(len(long_new), prompt=long_new).local_prefill
    # The prefill worker that holds the prompt is preferred, and its hit is what the route reports.
    prefill = [ep("p1", WorkerRole.PREFILL), ep("p2", WorkerRole.PREFILL, running=1)]
    r = router([ep("d", WorkerRole.DECODE)], prefill, blocks=index(p2=long_new))
    route = r.route(len(long_new), prompt=long_new)
    assert [p.worker_id for p in route.prefill] == ["p2", "p1"] and route.cached_blocks == 62


def test_a_burst_of_one_prefix_spreads_until_the_first_is_prefilled() -> None:
    # Blocks being computed help nobody yet: their tokens count as the worker's backlog until the
    # first token comes, so simultaneous arrivals are not all piled onto one worker.
    r = router([ep("a"), ep("b")], blocks=BlockIndex())
    first = r.acquire(r.route(len(PROMPT), prompt=PROMPT), len(PROMPT))
    second = r.route(len(PROMPT), prompt=PROMPT)
    assert second.decode.worker_id != first.route.decode.worker_id and second.decode_cached_blocks == 0
    r.acquire(second, len(PROMPT))
    first.prefilled()
    third = r.route(len(PROMPT), prompt=PROMPT)
    assert third.decode.worker_id == first.route.decode.worker_id and third.decode_cached_blocks == 41


def test_a_prefix_holder_whose_report_counts_our_queued_hit_whole_keeps_the_prefix() -> None:
    # a holds the system prompt; we send it a conversation that hits it (20 tokens to compute).
    # Its next report shows that request still waiting, counted whole (a worker finds the hit only
    # on admission): 660 tokens of "backlog" that are 20 of work. The next conversation of the same
    # system prompt must still go to a, not to b where all 656 tokens would be recomputed.
    source = FixedSource(WorkerSet((ep("a"), ep("b")), (), index(a=SYSTEM)))
    r = Router(source, policy=RoutingPolicy())
    first = r.route(len(PROMPT), prompt=PROMPT)
    assert first.decode.worker_id == "a" and first.decode_cached_blocks == 40
    r.acquire(first, len(PROMPT))
    reported = ep("a", reported_at=2, waiting=1, prefill_backlog_tokens=len(PROMPT))
    source.workers = WorkerSet((reported, ep("b")), (), source.workers.blocks)
    other = [*SYSTEM, *range(3000, 3020)]
    second = r.route(len(other), prompt=other)
    assert second.decode.worker_id == "a" and second.decode_cached_blocks == 40
    # Work the report counts beyond our own prompts (another gateway's) still weighs.
    busy = ep("a", reported_at=3, waiting=1, prefill_backlog_tokens=len(PROMPT) + 2000)
    source.workers = WorkerSet((busy, ep("b")), (), source.workers.blocks)
    assert r.route(len(other), prompt=other).decode.worker_id == "b"
