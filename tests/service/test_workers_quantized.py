"""Workers with int8 weights and an int8 KV cache as real processes (gloo): the quantized blocks
and their scales travel prefill to decode and give the colocated worker's tokens; a worker whose
cache is not int8 is refused by the layout check and the decode worker recomputes locally; W8A8
workers give the same tokens disaggregated as colocated."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalellm.v1 import worker_pb2
from tests.procs import Service, start_service
from tests.service.worker_calls import generate, wait_all_blocks_free, worker_args, worker_request

pytestmark = pytest.mark.slow

QUANTIZED = ("--quantization", "int8", "--kv-cache-dtype", "int8")


def _stop(*services: Service) -> None:
    for svc in services:
        assert svc.stop() == 0, svc.log()


@pytest.fixture(scope="module")
def workers(demo_model_dir: Path) -> Iterator[dict[str, Service]]:
    started = {
        "prefill": start_service(
            "services.prefill", worker_args(demo_model_dir, "--worker-id", "p8", *QUANTIZED)
        ),
        "plain_prefill": start_service("services.prefill", worker_args(demo_model_dir, "--worker-id", "p32")),
        "decode": start_service(
            "services.decode", worker_args(demo_model_dir, "--role", "decode", *QUANTIZED)
        ),
        "both": start_service("services.decode", worker_args(demo_model_dir, "--role", "both", *QUANTIZED)),
    }
    yield started
    _stop(*started.values())


async def test_int8_kv_travels_and_matches_the_colocated_worker(workers: dict[str, Service]) -> None:
    rng = random.Random(17)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(20, 100))] for _ in range(6)]
    target = [worker_pb2.PrefillTarget(worker_id="p8", address=workers["prefill"].address)]
    local = await generate(
        workers["both"].address, [worker_request(f"l{i}", p, 12, []) for i, p in enumerate(prompts)]
    )
    remote = await generate(
        workers["decode"].address, [worker_request(f"r{i}", p, 12, target) for i, p in enumerate(prompts)]
    )
    assert [tokens for tokens, _ in remote] == [tokens for tokens, _ in local]
    for (_, last), prompt in zip(remote, prompts, strict=True):
        blocks = -(-len(prompt) // 16)
        # an int8 block: 30 layers x K,V x 16 tokens x 3 heads x (64 values + a 2-byte scale)
        assert last.timings.transfer_bytes == blocks * 30 * 2 * 16 * 3 * 66
    await wait_all_blocks_free(workers["decode"])


async def test_a_prefill_worker_with_another_kv_dtype_is_refused_and_the_prompt_recomputed(
    workers: dict[str, Service],
) -> None:
    prompt = list(range(200, 260))
    target = [worker_pb2.PrefillTarget(worker_id="p32", address=workers["plain_prefill"].address)]
    [(local, _)] = await generate(workers["both"].address, [worker_request("l", prompt, 8, [])])
    [(remote, last)] = await generate(workers["decode"].address, [worker_request("r", prompt, 8, target)])
    assert remote == local
    assert last.timings.transfer_bytes == 0
    assert "KV layout mismatch" in workers["plain_prefill"].log() + workers["decode"].log()
    await wait_all_blocks_free(workers["decode"])


@pytest.fixture(scope="module")
def w8a8_workers(demo_model_dir: Path) -> Iterator[dict[str, Service]]:
    w8a8 = ("--quantization", "w8a8")
    started = {
        "prefill": start_service(
            "services.prefill", worker_args(demo_model_dir, "--worker-id", "pw8", *w8a8)
        ),
        "decode": start_service("services.decode", worker_args(demo_model_dir, "--role", "decode", *w8a8)),
        "both": start_service("services.decode", worker_args(demo_model_dir, "--role", "both", *w8a8)),
    }
    yield started
    _stop(*started.values())


async def test_w8a8_prompts_prefilled_elsewhere_decode_to_the_colocated_tokens(
    w8a8_workers: dict[str, Service],
) -> None:
    """W8A8 (int8 weights and activations, CPU) disaggregated: the prefill worker's KV and first
    token continue on the decode side exactly as a colocated prefill does (the kernel's result
    for a row does not depend on the batch). One request at a time, so each prompt is prefilled
    in one piece on both sides: W8A8 turns the last-bit differences of a chunked prefill's
    attention into int8 rounding flips, so tokens may differ when the chunking does."""
    rng = random.Random(23)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(20, 100))] for _ in range(4)]
    target = [worker_pb2.PrefillTarget(worker_id="pw8", address=w8a8_workers["prefill"].address)]
    for i, prompt in enumerate(prompts):
        [(local, _)] = await generate(w8a8_workers["both"].address, [worker_request(f"l{i}", prompt, 12, [])])
        [(remote, last)] = await generate(
            w8a8_workers["decode"].address, [worker_request(f"r{i}", prompt, 12, target)]
        )
        assert remote == local
        assert last.timings.transfer_bytes > 0  # the prompt's KV did travel
    await wait_all_blocks_free(w8a8_workers["decode"])
