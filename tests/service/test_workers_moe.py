"""Mixture-of-experts models through real worker processes: tiny random Mixtral and Qwen3-MoE give
transformers' greedy output colocated, and disaggregated (KV over gloo) across tensor-parallel sizes
too: TP=1 -> 1 (Mixtral), 2 -> 1 (Qwen3-MoE), 1 -> 2 and 2 -> 2 (Qwen2-MoE)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scalellm.v1 import worker_pb2
from tests.procs import Service, child_pids, start_service
from tests.service.worker_calls import generate, wait_all_blocks_free, worker_args, worker_request
from tests.tiny_models import hf_greedy

pytestmark = pytest.mark.slow


def _workload(model: Path, seed: str) -> tuple[list[tuple[list[int], int]], list[list[int]]]:
    """Six (prompt, max_tokens) pairs and transformers' greedy continuations of them."""
    rng = random.Random(seed)
    work = [
        ([rng.randrange(3, 512) for _ in range(rng.randint(2, 70))], rng.randint(4, 14)) for _ in range(6)
    ]
    return work, [hf_greedy(model, [p], n)[0] for p, n in work]


async def _check(
    worker: Service, model: Path, seed: str, targets: list[worker_pb2.PrefillTarget] | None = None
) -> list[worker_pb2.GenerateResponse]:
    """The workload through the worker equals transformers; its blocks are all free after.
    Returns each request's last message."""
    work, expected = _workload(model, seed)
    reqs = [worker_request(f"{seed}-{i}", p, n, targets or []) for i, (p, n) in enumerate(work)]
    results = await generate(worker.address, reqs)
    assert [tokens for tokens, _ in results] == expected
    await wait_all_blocks_free(worker)
    return [last for _, last in results]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
async def test_colocated_moe_worker_matches_transformers(tiny_model_factory, family: str) -> None:  # type: ignore[no-untyped-def]
    model: Path = tiny_model_factory(family)
    worker = start_service("services.decode", worker_args(model, "--role", "both"))
    try:
        await _check(worker, model, family)
    finally:
        assert worker.stop() == 0, worker.log()


async def test_disaggregated_mixtral_matches_transformers(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    model: Path = tiny_model_factory("mixtral")
    prefill = start_service("services.prefill", worker_args(model, "--worker-id", "moe-prefill"))
    decode = start_service("services.decode", worker_args(model, "--role", "decode"))
    try:
        target = [worker_pb2.PrefillTarget(worker_id="moe-prefill", address=prefill.address)]
        lasts = await _check(decode, model, "disagg", target)
        assert all(last.timings.transfer_bytes > 0 for last in lasts)
    finally:
        assert decode.stop() == 0, decode.log()
        assert prefill.stop() == 0, prefill.log()


async def test_tensor_parallel_worker_matches_transformers_and_stops_its_ranks(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """A colocated worker with --tensor-parallel-size 2 on Mixtral (experts split 2 + 2): the
    same greedy tokens; on SIGTERM its rank process is gone before the worker exits."""
    model: Path = tiny_model_factory("mixtral")
    worker = start_service(
        "services.decode", worker_args(model, "--role", "both", "--tensor-parallel-size", "2")
    )
    ranks = child_pids(worker.proc.pid)
    try:
        assert len(ranks) == 1 and all("scalellm.engine.tp_ranks" in cmd for cmd in ranks.values())
        await _check(worker, model, "tp2")
    finally:
        assert worker.stop() == 0, worker.log()
    alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    assert not alive, f"rank processes {alive} outlived their worker"


async def test_a_tp2_decode_worker_takes_kv_from_tp1_and_tp2_prefill_workers(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """Pushed KV has all the model's K/V heads whatever the sender's size; a TP=2 decode worker
    lands it beside its cache and scatters each rank its half (engine.scatter_kv). Requests
    alternate between a TP=1 and a TP=2 prefill worker: transformers' tokens (= colocated TP=1's,
    tests/unit/test_tensor_parallel.py), every prompt's KV pushed, none recomputed."""
    model: Path = tiny_model_factory("qwen2_moe")
    prefills = {
        tp: start_service(
            "services.prefill",
            worker_args(model, "--worker-id", f"tp{tp}-prefill", "--tensor-parallel-size", str(tp)),
        )
        for tp in (1, 2)
    }
    decode = start_service(
        "services.decode", worker_args(model, "--role", "decode", "--tensor-parallel-size", "2")
    )
    try:
        work, expected = _workload(model, "to-tp2")
        targets = {
            tp: [worker_pb2.PrefillTarget(worker_id=f"tp{tp}-prefill", address=prefills[tp].address)]
            for tp in (1, 2)
        }
        reqs = [worker_request(f"to-tp2-{i}", p, n, targets[1 + i % 2]) for i, (p, n) in enumerate(work)]
        results = await generate(decode.address, reqs)
        assert [tokens for tokens, _ in results] == expected
        assert all(last.timings.transfer_bytes > 0 for _, last in results)
        for worker in (decode, *prefills.values()):
            await wait_all_blocks_free(worker)
    finally:
        assert decode.stop() == 0, decode.log()
        for worker in prefills.values():
            assert worker.stop() == 0, worker.log()


async def test_a_tp2_prefill_worker_feeds_a_tp1_decode_worker_exactly(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """The prefill worker's ranks hold half the K/V heads each; the push gathers them (head order)
    into the decode worker's single-rank layout, and the decode continues transformers' tokens."""
    model: Path = tiny_model_factory("qwen3_moe")
    prefill = start_service(
        "services.prefill", worker_args(model, "--worker-id", "tp2-prefill", "--tensor-parallel-size", "2")
    )
    decode = start_service("services.decode", worker_args(model, "--role", "decode"))
    try:
        target = [worker_pb2.PrefillTarget(worker_id="tp2-prefill", address=prefill.address)]
        lasts = await _check(decode, model, "tp2-to-tp1", target)
        assert all(last.timings.transfer_bytes > 0 for last in lasts)
        await wait_all_blocks_free(prefill)
    finally:
        assert decode.stop() == 0, decode.log()
        assert prefill.stop() == 0, prefill.log()
