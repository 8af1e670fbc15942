"""The engine's lifecycle methods on a real engine (tiny random Llama, CPU): prefill-only with kept
blocks and release, reservations for remote KV and its landing, abort_all, the stats snapshot, and
the same through AsyncEngine on its step thread."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from scalellm.engine.async_engine import AsyncEngine, build_engine
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.events import TokenEvent
from scalellm.engine.request import RequestStatus
from scalellm.kvhash import prompt_block_hashes
from scalellm.types import FinishReason, InvalidParameter, SamplingParams

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)


def _engine(model: Path, blocks: int = 64) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(model), dtype="float32", device="cpu", num_kv_blocks=blocks, block_size=BLOCK)
    )


def _prompt(seed: int, n: int = 18) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def _drain(engine: LLMEngine) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {}
    while engine.has_unfinished():
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
    return events


def _alone(model: Path, prompt: list[int]) -> list[int]:
    engine = _engine(model)
    events = _drain_one(engine, prompt)
    return [e.token_id for e in events if e.token_id is not None]


def _drain_one(engine: LLMEngine, prompt: list[int]) -> list[TokenEvent]:
    engine.add_request("alone", prompt, GREEDY)
    return _drain(engine)["alone"]


def test_prefill_only_keeps_its_blocks_until_released(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    prompt = _prompt(1)
    req = engine.make_request("p", prompt, GREEDY, prefill_only=True)
    engine.add(req)
    (event,) = _drain(engine)["p"]
    assert event.token_id == _alone(tiny_llama, prompt)[0]
    assert event.outcome is not None and event.outcome.finish_reason is FinishReason.LENGTH
    kept = event.outcome.kept_block_ids
    assert len(kept) == -(-len(prompt) // BLOCK)
    assert engine.stats().num_free_blocks == engine.num_blocks - len(kept)
    engine.release("p")
    engine.release("p")  # twice: a no-op
    assert engine.stats().num_free_blocks == engine.num_blocks


def test_aborting_a_finished_prefill_only_request_gives_its_blocks_back(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    engine.add(engine.make_request("p", _prompt(2), GREEDY, prefill_only=True))
    _drain(engine)
    assert engine.num_free_blocks < engine.num_blocks
    assert engine.abort_request("p") is None  # already finished ...
    assert engine.num_free_blocks == engine.num_blocks  # ... but its kept blocks return


def test_remote_kv_landed_continues_exactly_as_the_engine_alone(tiny_llama: Path) -> None:
    """Prefill on one engine, copy its KV into another engine's reservation, land it there: the
    decoded tokens (and the cached count passed along) are what one engine gives alone."""
    prompt = _prompt(3)
    expected = _alone(tiny_llama, prompt)
    prefill, decode = _engine(tiny_llama), _engine(tiny_llama)
    prefill.add(prefill.make_request("r", prompt, GREEDY, prefill_only=True))
    (first,) = _drain(prefill)["r"]
    assert first.outcome is not None and first.token_id is not None

    req = decode.make_request("r", prompt, GREEDY)
    reservation = decode.reserve_remote(req)
    assert reservation is not None and reservation.skip_blocks == 0
    assert decode.stats().num_running == 1 and not decode.has_unfinished()
    for src, dst in zip(first.outcome.kept_block_ids, reservation.block_ids, strict=True):
        decode.kv_cache[dst].copy_(prefill.kv_cache[src])
    prefill.release("r")

    landed = decode.remote_kv_landed("r", first.token_id, first.logprobs, num_cached_tokens=5)
    assert landed.token_id == first.token_id and landed.logprobs == first.logprobs and not landed.finished
    rest = _drain(decode)["r"]
    assert [landed.token_id, *(e.token_id for e in rest)] == expected
    done = rest[-1].outcome
    assert done is not None and done.usage.cached_prompt_tokens == 5
    assert done.num_output_tokens == len(expected) and done.scheduled_time is None
    assert decode.num_free_blocks == decode.num_blocks and prefill.num_free_blocks == prefill.num_blocks


def test_a_reservation_skips_the_decode_sides_own_prefix_hits(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    prompt = _prompt(4, n=17)
    _drain_one(engine, prompt)  # its full blocks are now in the prefix cache
    reservation = engine.reserve_remote(engine.make_request("r", prompt, GREEDY))
    assert reservation is not None
    assert reservation.skip_blocks == 4 and len(reservation.block_ids) == 1  # 17 tokens: 4 full + 1


def test_no_room_reserves_nothing(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama, blocks=8)
    assert engine.reserve_remote(engine.make_request("a", _prompt(5, n=20), GREEDY)) is not None
    assert engine.reserve_remote(engine.make_request("b", _prompt(6, n=20), GREEDY)) is None
    assert engine.stats().num_free_blocks == 3 and engine.stats().num_running == 1


def test_a_first_token_that_ends_the_request_finishes_it_at_landing(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    req = engine.make_request("r", _prompt(6), SamplingParams(temperature=0.0, max_tokens=1))
    assert engine.reserve_remote(req) is not None
    event = engine.remote_kv_landed("r", 7, None, num_cached_tokens=0)
    assert event.outcome is not None and event.outcome.finish_reason is FinishReason.LENGTH
    assert event.outcome.num_output_tokens == 1
    assert engine.num_free_blocks == engine.num_blocks


def test_abort_all_aborts_waiting_running_and_remote_requests(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    engine.add_request("running", _prompt(7), GREEDY)
    engine.step()
    engine.add_request("waiting", _prompt(8), GREEDY)
    remote = engine.make_request("remote", _prompt(9), GREEDY)
    reservation = engine.reserve_remote(remote)
    assert reservation is not None

    events = engine.abort_all()
    assert sorted(e.request_id for e in events) == ["remote", "running", "waiting"]
    assert all(e.outcome and e.outcome.finish_reason is FinishReason.ABORT for e in events)
    assert not engine.has_unfinished()
    # The reservation stays held while a transfer might still write into it ...
    assert engine.num_free_blocks == engine.num_blocks - len(reservation.block_ids)
    # ... and its landing reports the abort and frees it.
    landed = engine.remote_kv_landed("remote", 11, None, num_cached_tokens=0)
    assert landed.token_id is None and landed.outcome is not None
    assert landed.outcome.finish_reason is FinishReason.ABORT
    assert engine.num_free_blocks == engine.num_blocks and engine.stats().num_running == 0


def test_abort_all_then_abort_frees_a_reservation(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    assert engine.reserve_remote(engine.make_request("remote", _prompt(10), GREEDY)) is not None
    engine.abort_all()
    assert engine.abort_request("remote") is not None
    assert engine.num_free_blocks == engine.num_blocks


def test_stats_count_running_waiting_and_remote(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)
    assert engine.stats().num_blocks == engine.num_blocks == 64
    engine.add_request("a", _prompt(11), GREEDY)
    engine.add_request("b", _prompt(12), GREEDY)
    assert (engine.stats().num_waiting, engine.stats().num_running) == (2, 0)
    engine.step()
    assert (engine.stats().num_waiting, engine.stats().num_running) == (0, 2)
    assert engine.reserve_remote(engine.make_request("c", _prompt(13), GREEDY)) is not None
    stats = engine.stats()
    assert stats.num_running == 3 and stats.num_free_blocks == engine.num_free_blocks < 64


@pytest.mark.parametrize(
    ("params", "field"),
    [(SamplingParams(n=2), "n"), (SamplingParams(stop=("x",)), "stop")],
)
def test_what_only_the_gateway_does_is_refused(tiny_llama: Path, params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        _engine(tiny_llama).make_request("r", [5, 6], params)
    assert err.value.field == field


# ---- the asyncio face ----------------------------------------------------------------------------


async def _collect(events: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [e async for e in events]


async def test_async_engine_runs_the_disaggregated_lifecycle(tiny_llama: Path) -> None:
    prompt = _prompt(14)
    expected = _alone(tiny_llama, prompt)
    prefill, decode = AsyncEngine(_engine(tiny_llama)), AsyncEngine(_engine(tiny_llama))
    prefill.start()
    decode.start()
    try:
        req = prefill.engine.make_request("r", prompt, GREEDY, prefill_only=True)
        (first,) = [e async for e in prefill.add_and_stream(req)]
        assert first.outcome is not None and first.token_id is not None

        target = decode.engine.make_request("r", prompt, GREEDY)
        reservation = await decode.reserve_remote(target)
        assert reservation is not None
        for src, dst in zip(first.outcome.kept_block_ids, reservation.block_ids, strict=True):
            decode.engine.kv_cache[dst].copy_(prefill.engine.kv_cache[src])
        await prefill.release("r")
        await asyncio.wrap_future(prefill.barrier())
        assert prefill.stats.num_free_blocks == prefill.engine.num_blocks

        events = decode.open_stream(target)
        landed = await decode.remote_kv_landed("r", first.token_id, first.logprobs, 0)
        rest = [e async for e in decode.iterate(events)]
        decode.close_stream(target)
        assert [landed.token_id, *(e.token_id for e in rest)] == expected
        await asyncio.wrap_future(decode.barrier())
        assert decode.stats.num_free_blocks == decode.engine.num_blocks
    finally:
        prefill.stop()
        decode.stop()


async def test_a_failed_step_aborts_every_request_including_remote_ones(tiny_llama: Path) -> None:
    aengine = AsyncEngine(_engine(tiny_llama))
    engine = aengine.engine
    aengine.start()
    try:
        remote = engine.make_request("remote", _prompt(15), GREEDY)
        assert await aengine.reserve_remote(remote) is not None
        remote_events = aengine.open_stream(remote)

        def broken(*args: object) -> object:
            raise RuntimeError("injected step failure")

        engine.runner.forward = broken  # type: ignore[method-assign]
        local = engine.make_request("local", _prompt(16), GREEDY)
        (event,) = [e async for e in aengine.add_and_stream(local)]
        assert event.token_id is None and event.outcome is not None
        assert event.outcome.finish_reason is FinishReason.ABORT
        (aborted,) = await asyncio.wait_for(_collect(aengine.iterate(remote_events)), 120)  # hang guard
        assert aborted.outcome is not None and aborted.outcome.status is RequestStatus.FINISHED_ABORTED
        landed = await aengine.remote_kv_landed("remote", 3, None, 0)
        assert landed.outcome is not None and landed.outcome.finish_reason is FinishReason.ABORT
        await asyncio.wrap_future(aengine.barrier())
        assert aengine.stats.num_free_blocks == engine.num_blocks and aengine.stats.num_running == 0
    finally:
        aengine.stop()


async def test_block_hashes_are_readable_while_a_step_runs(tiny_llama: Path) -> None:
    """The registry heartbeat takes the cached block hashes; a step that runs for seconds (a long
    prefill on a CPU) must not hold it up: a heartbeat that waited for the step boundary let the
    worker's lease expire under a burst of long prompts."""
    aengine = AsyncEngine(_engine(tiny_llama))
    engine = aengine.engine
    aengine.start()
    in_step, release = threading.Event(), threading.Event()
    try:
        prompt = _prompt(17)
        await _collect(aengine.add_and_stream(engine.make_request("first", prompt, GREEDY)))
        await asyncio.wrap_future(aengine.barrier())
        cached = set(engine.blocks.cached)
        assert set(prompt_block_hashes(prompt, BLOCK)) <= cached
        assert set(aengine.take_block_hash_delta().added) == cached

        forward = engine.runner.forward

        def held(*args: object, **kwargs: object) -> object:
            in_step.set()
            release.wait(120)
            return forward(*args, **kwargs)  # type: ignore[arg-type]

        engine.runner.forward = held  # type: ignore[method-assign]
        second = asyncio.ensure_future(
            _collect(aengine.add_and_stream(engine.make_request("second", _prompt(18), GREEDY)))
        )
        assert await asyncio.to_thread(in_step.wait, 120)
        full = aengine.take_block_hash_delta(full=True)  # the step is still under way
        assert full.reset and set(full.added) == cached
        assert aengine.take_block_hash_delta().empty
        release.set()
        await asyncio.wait_for(second, 120)
        await asyncio.wrap_future(aengine.barrier())
        delta = aengine.take_block_hash_delta()
        assert set(delta.added) == set(engine.blocks.cached) - cached and not delta.removed
    finally:
        release.set()
        aengine.stop()


def _os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc (Linux)")
def test_build_engine_builds_on_a_thread_that_leaves_no_openmp_team_behind(tiny_llama: Path) -> None:
    """The worker loads its model through build_engine so that only the step thread keeps an
    OpenMP team (more OpenMP threads than CPUs make every team sleep between kernels)."""
    before = _os_threads()
    callers: list[int] = []
    spawned: set[str] = set()
    team: list[int] = []

    def build() -> LLMEngine:
        callers.append(threading.get_ident())
        team.append(torch.get_num_threads())  # a new thread's: torch's last set_num_threads
        torch.ones(1 << 22).mul_(2)  # far above ATen's grain size: a parallel kernel, a team
        spawned.update(_os_threads() - before)  # this thread and its team's
        return _engine(tiny_llama)

    engine = build_engine(build)
    try:
        assert callers and callers[0] != threading.get_ident()
        if team[0] > 1:
            assert len(spawned) >= 2  # the loader thread and at least one team thread
        # the threads end just after the join (their OpenMP pool is torn down at thread exit)
        deadline = time.monotonic() + 10
        while spawned & _os_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not spawned & _os_threads()
        assert _drain_one(engine, _prompt(0))[-1].finished
    finally:
        engine.close()

    def bad_model() -> LLMEngine:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):  # raised on the loader thread, re-raised here
        build_engine(bad_model)
