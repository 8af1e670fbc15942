"""Mixture-of-experts models through real worker processes: tiny random Mixtral and Qwen3-MoE give
transformers' greedy output colocated, and Mixtral disaggregated (KV over gloo) too."""

from __future__ import annotations

import random
from pathlib import Path

import psutil
import pytest

from scalellm.v1 import worker_pb2
from tests.procs import start_service
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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
async def test_colocated_moe_worker_matches_transformers(tiny_model_factory, family: str) -> None:  # type: ignore[no-untyped-def]
    model: Path = tiny_model_factory(family)
    work, expected = _workload(model, family)
    worker = start_service("services.decode", worker_args(model, "--role", "both"))
    try:
        reqs = [worker_request(f"{family}-{i}", p, n, []) for i, (p, n) in enumerate(work)]
        results = await generate(worker.address, reqs)
        assert [tokens for tokens, _ in results] == expected
        await wait_all_blocks_free(worker)
    finally:
        assert worker.stop() == 0, worker.log()


async def test_disaggregated_mixtral_matches_transformers(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    model: Path = tiny_model_factory("mixtral")
    work, expected = _workload(model, "disagg")
    prefill = start_service("services.prefill", worker_args(model, "--worker-id", "moe-prefill"))
    decode = start_service("services.decode", worker_args(model, "--role", "decode"))
    try:
        target = [worker_pb2.PrefillTarget(worker_id="moe-prefill", address=prefill.address)]
        reqs = [worker_request(f"d-{i}", p, n, target) for i, (p, n) in enumerate(work)]
        results = await generate(decode.address, reqs)
        assert [tokens for tokens, _ in results] == expected
        assert all(last.timings.transfer_bytes > 0 for _, last in results)
        await wait_all_blocks_free(decode)
    finally:
        assert decode.stop() == 0, decode.log()
        assert prefill.stop() == 0, prefill.log()


async def test_tensor_parallel_worker_matches_transformers_and_stops_its_ranks(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """A colocated worker with --tensor-parallel-size 2 on Mixtral (experts split 2 + 2): the
    same greedy tokens; on SIGTERM its rank process is gone before the worker exits."""
    model: Path = tiny_model_factory("mixtral")
    work, expected = _workload(model, "tp2")
    worker = start_service(
        "services.decode", worker_args(model, "--role", "both", "--tensor-parallel-size", "2")
    )
    ranks = psutil.Process(worker.proc.pid).children()
    try:
        assert len(ranks) == 1 and "scalellm.engine.tp_ranks" in ranks[0].cmdline()
        reqs = [worker_request(f"tp-{i}", p, n, []) for i, (p, n) in enumerate(work)]
        results = await generate(worker.address, reqs)
        assert [tokens for tokens, _ in results] == expected
        await wait_all_blocks_free(worker)
    finally:
        assert worker.stop() == 0, worker.log()
    assert not any(rank.is_running() for rank in ranks), "a rank process outlived its worker"
