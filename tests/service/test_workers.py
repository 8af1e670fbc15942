"""Prefill and decode workers as real processes on CPU (gloo): exactness, failures, no leaks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scalellm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.procs import Service, await_until, start_service
from tests.service.worker_calls import (
    generate,
    until_not_serving,
    wait_all_blocks_free,
    worker_args,
    worker_request,
)

pytestmark = pytest.mark.slow

PREFILL_ID = "prefill-test"


@dataclass
class Mesh:
    decode: Service
    prefill: Service | None

    @property
    def targets(self) -> list[worker_pb2.PrefillTarget]:
        if self.prefill is None:
            return []
        return [worker_pb2.PrefillTarget(worker_id=PREFILL_ID, address=self.prefill.address)]


@pytest.fixture(scope="module")
def workload(demo_model_dir: Path) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """32 prompts of mixed lengths and their greedy continuations from the engine alone."""
    from scalellm import LLM, SamplingParams

    rng = random.Random(3)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(4, 120))] for _ in range(32)]
    lengths = [rng.randint(4, 24) for _ in range(32)]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=600)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
    )
    return prompts, lengths, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def disagg(demo_model_dir: Path) -> Iterator[Mesh]:
    prefill = start_service("services.prefill", worker_args(demo_model_dir, "--worker-id", PREFILL_ID))
    decode = start_service("services.decode", worker_args(demo_model_dir, "--role", "decode"))
    yield Mesh(decode, prefill)
    assert decode.stop() == 0, decode.log()
    assert prefill.stop() == 0, prefill.log()


@pytest.fixture(scope="module")
def colocated(demo_model_dir: Path) -> Iterator[Mesh]:
    decode = start_service("services.decode", worker_args(demo_model_dir, "--role", "both"))
    yield Mesh(decode, None)
    assert decode.stop() == 0, decode.log()


@pytest.mark.parametrize("mesh_name", ["disagg", "colocated"])
async def test_32_concurrent_requests_match_the_engine_alone(request, mesh_name: str, workload) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = request.getfixturevalue(mesh_name)
    prompts, lengths, expected = workload
    reqs = [
        worker_request(f"{mesh_name}-{i}", p, n, mesh.targets)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    results = await generate(mesh.decode.address, reqs)
    assert [tokens for tokens, _ in results] == expected
    for (tokens, last), p in zip(results, prompts, strict=True):
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(p) and last.usage.completion_tokens == len(tokens)
        if mesh.prefill is not None:
            assert last.timings.transfer_bytes > 0
    await wait_all_blocks_free(mesh.decode)


async def test_seeded_sampling_matches_across_the_split(disagg: Mesh, colocated: Mesh) -> None:
    req = worker_request("seeded", [5, 6, 7, 8, 9] * 6, 12, [], temperature=0.9, seed=7)
    other = worker_request("seeded-8", [5, 6, 7, 8, 9] * 6, 12, [], temperature=0.9, seed=8)
    (local, _), (local_other, _) = await generate(colocated.decode.address, [req, other])
    req.prefill.extend(disagg.targets)
    [(remote, _)] = await generate(disagg.decode.address, [req])
    assert local == remote  # the seed, not where the prompt ran, decides the tokens
    assert local_other != local  # and it does decide them


async def test_blocks_the_decode_worker_has_cached_are_not_sent(disagg: Mesh) -> None:
    """A prompt whose head is in the decode worker's own prefix cache: only the tail travels, and
    the output equals the one computed from a full transfer."""
    rng = random.Random(11)
    prompt, block_size = [rng.randrange(100, 49000) for _ in range(90)], 16  # a prompt no test sent
    [(first, last_first)] = await generate(
        disagg.decode.address, [worker_request("cache-1", prompt, 8, disagg.targets)]
    )
    [(again, last_again)] = await generate(
        disagg.decode.address, [worker_request("cache-2", prompt, 8, disagg.targets)]
    )
    assert first == again
    blocks = -(-len(prompt) // block_size)
    cached = (len(prompt) - 1) // block_size  # the last block is always sent
    sent_first, sent_again = last_first.timings.transfer_bytes, last_again.timings.transfer_bytes
    assert sent_first % blocks == 0 and sent_again == sent_first // blocks * (blocks - cached)
    await wait_all_blocks_free(disagg.decode)


async def test_bad_requests_are_invalid_argument(disagg: Mesh) -> None:
    bad = [
        worker_request("r1", [1, 2, 10**6], 4, disagg.targets),
        worker_request("", [1, 2], 4, []),
        worker_request("r3", [], 4, []),
        worker_request("r4", [1, 2], 4, [], top_p=1.5),
    ]
    for req in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(disagg.decode.address, [req])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert (await generate(disagg.decode.address, [worker_request("ok", [1, 2, 3], 2, disagg.targets)]))[0][0]


async def test_no_room_is_resource_exhausted_at_once(demo_model_dir: Path) -> None:
    small = start_service(
        "services.decode", [*worker_args(demo_model_dir, "--role", "decode"), "--num-kv-blocks", "20"]
    )
    try:
        async with grpc.aio.insecure_channel(small.address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            occupant = stub.Generate(worker_request("occupant", [9] * 250, 60, []))  # 16 of 20 blocks
            async for _ in occupant:
                break
            targets = [worker_pb2.PrefillTarget(worker_id="nobody", address="127.0.0.1:1")]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(worker_request("big", [7] * 100, 4, targets)):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "free KV blocks" in (err.value.details() or "")
            occupant.cancel()
        await wait_all_blocks_free(small)
    finally:
        assert small.stop() == 0


async def test_cancelled_stream_frees_its_blocks(disagg: Mesh) -> None:
    """Cancelled mid-decode (its prefill is long done: a cancel during the prefill or the transfer is
    tests/service/test_worker_faults.py's)."""
    before = disagg.decode.metric("scalellm_generated_tokens_total")
    async with grpc.aio.insecure_channel(disagg.decode.address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        call = stub.Generate(worker_request("cancel-me", [11] * 300, 2000, disagg.targets))
        got = 0
        async for msg in call:
            got += len(msg.token_ids)
            if got >= 3:
                call.cancel()
                break
    await wait_all_blocks_free(disagg.decode)
    assert disagg.decode.metric("scalellm_generated_tokens_total") - before < 1000  # not its 2000


async def test_health_and_reflection(disagg: Mesh) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for svc, name in (
        (disagg.decode, "scalellm.v1.DecodeWorker"),
        (disagg.prefill, "scalellm.v1.PrefillWorker"),
    ):
        assert svc is not None
        async with grpc.aio.insecure_channel(svc.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name)
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            async for answer in stream:
                assert name in [s.name for s in answer.list_services_response.service]
                break


async def test_killing_the_prefill_worker_under_load_loses_no_request(demo_model_dir: Path, workload) -> None:  # type: ignore[no-untyped-def]
    prompts, lengths, expected = workload
    prefill = start_service("services.prefill", worker_args(demo_model_dir, "--worker-id", "doomed"))
    decode = start_service(
        "services.decode", worker_args(demo_model_dir, "--role", "decode", "--transfer-timeout", "10")
    )
    try:
        targets = [worker_pb2.PrefillTarget(worker_id="doomed", address=prefill.address)]
        reqs = [
            worker_request(f"k{i}", p, n, targets)
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        first_token = asyncio.Event()

        async def killer() -> None:
            await first_token.wait()
            prefill.kill()

        async with grpc.aio.insecure_channel(decode.address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)

            async def one(req: worker_pb2.GenerateRequest) -> list[int]:
                tokens: list[int] = []
                async for msg in stub.Generate(req):
                    tokens += msg.token_ids
                    first_token.set()
                return tokens

            results, _ = await asyncio.gather(asyncio.gather(*(one(r) for r in reqs)), killer())
        assert results == expected, decode.log()
        assert "recomputing" in decode.log()  # some requests really lost their prefill worker
        await wait_all_blocks_free(decode)
        again = await generate(decode.address, [worker_request("after", prompts[0], lengths[0], targets)])
        assert again[0][0] == expected[0]
    finally:
        prefill.kill()
        assert decode.stop() == 0, decode.log()


async def test_layout_mismatch_is_refused_with_a_clear_error(demo_model_dir: Path) -> None:
    prefill = start_service(
        "services.prefill", worker_args(demo_model_dir, "--worker-id", "odd", "--block-size", "8")
    )
    decode = start_service(
        "services.decode", worker_args(demo_model_dir, "--role", "decode", "--prefill-fallback", "fail")
    )
    try:
        targets = [worker_pb2.PrefillTarget(worker_id="odd", address=prefill.address)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(decode.address, [worker_request("mismatch", [3] * 40, 4, targets)])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "block_size" in (err.value.details() or ""), err.value.details()
        await wait_all_blocks_free(decode)
    finally:
        assert prefill.stop() == 0
        assert decode.stop() == 0


async def test_sigterm_drains_in_flight_requests(demo_model_dir: Path) -> None:
    decode = start_service("services.decode", worker_args(demo_model_dir, "--role", "both"))
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        call = stub.Generate(worker_request("drained", [4] * 50, 40, []))
        tokens: list[int] = []
        async for msg in call:
            tokens += msg.token_ids
            if len(tokens) == 1:
                decode.proc.send_signal(15)
                await until_not_serving(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:  # new work is refused while draining
                    async for _ in stub.Generate(worker_request("late", [4] * 5, 2, [])):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(tokens) == 40  # the in-flight request finished
    assert decode.proc.wait(30) == 0


async def _session_run(
    address: str, messages: list[worker_pb2.SessionRequest]
) -> tuple[dict[str, list[int]], dict[str, worker_pb2.SessionUpdate], list[int]]:
    """Send messages on one Session stream, half-close, read it to its end: tokens per request, each
    request's last update, and the number of updates each SessionResponse carried."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, worker_pb2.SessionUpdate] = {}
    sizes: list[int] = []

    async def requests():  # type: ignore[no-untyped-def]
        for message in messages:
            yield message

    async with grpc.aio.insecure_channel(address) as channel:
        async for response in worker_pb2_grpc.DecodeWorkerStub(channel).Session(requests()):
            sizes.append(len(response.updates))
            for update in response.updates:
                assert update.request_id not in last, "an update after the request's last one"
                tokens.setdefault(update.request_id, []).extend(update.response.token_ids)
                if update.error_code or update.response.finish_reason:
                    last[update.request_id] = update
    return tokens, last, sizes


@pytest.mark.parametrize("mesh_name", ["disagg", "colocated"])
async def test_session_serves_many_requests_on_one_stream(request, mesh_name: str, workload) -> None:  # type: ignore[no-untyped-def]
    """The gateway's path: the 32 requests on one Session stream equal the engine alone, several
    requests share a message, a bad request fails alone, and half-closing ends the stream."""
    mesh: Mesh = request.getfixturevalue(mesh_name)
    prompts, lengths, expected = workload
    good = [
        worker_request(f"s-{mesh_name}-{i}", p, n, mesh.targets)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    twin = worker_request("s-twin", [5] * 30, 500, [])
    bad = worker_request("s-bad", [1, 2, 10**6], 4, mesh.targets)  # out of vocabulary
    sent = [twin, good[0], bad, *good[1:], twin]  # the second twin reuses a running id
    messages = [worker_pb2.SessionRequest(generate=g) for g in sent]
    tokens, last, sizes = await _session_run(mesh.decode.address, messages)
    assert [tokens[g.request_id] for g in good] == expected
    assert all(last[g.request_id].response.finish_reason == common_pb2.FINISH_REASON_LENGTH for g in good)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert last["s-bad"].error_code == invalid, last["s-bad"]
    assert last["s-twin"].error_code == invalid and "already running" in last["s-twin"].error_message
    assert max(sizes) > 1, sizes  # one message carried several requests' tokens
    await wait_all_blocks_free(mesh.decode)


async def test_session_cancel_frees_blocks_and_keeps_the_stream(disagg: Mesh) -> None:
    """Through the gateway's WorkerSession: a cancelled request stops and frees its blocks, a deadline
    ends a request with DEADLINE_EXCEEDED (and it stops too), and the same stream serves the next
    request. (Each would generate 2000 tokens: the worker's token counter tells that it stopped.)"""
    import time

    from services.gateway.request import WorkerFailure
    from services.gateway.session import WorkerSession

    async with grpc.aio.insecure_channel(disagg.decode.address) as channel:
        session = WorkerSession(worker_pb2_grpc.DecodeWorkerStub(channel), disagg.decode.address)
        far = time.perf_counter() + 600  # a deadline no request should reach: a hang guard
        before = disagg.decode.metric("scalellm_generated_tokens_total")
        call = session.start(worker_request("s-cancel", [11] * 300, 2000, disagg.targets), far)
        got = 0
        while got < 3:
            got += len((await call.read()).token_ids)  # type: ignore[union-attr]
        assert call.cancel()
        with pytest.raises(WorkerFailure) as err:
            await call.read()
        assert err.value.status == grpc.StatusCode.CANCELLED
        await wait_all_blocks_free(disagg.decode)

        late = session.start(worker_request("s-deadline", [12] * 40, 2000, []), time.perf_counter() + 0.5)
        with pytest.raises(WorkerFailure) as err:
            while True:
                await late.read()
        assert err.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_all_blocks_free(disagg.decode)
        assert disagg.decode.metric("scalellm_generated_tokens_total") - before < 2000  # both stopped

        again = session.start(worker_request("s-again", [1, 2, 3], 3, []), far)
        out: list[int] = []
        while (msg := await again.read()) is not None:
            out += msg.token_ids
        assert len(out) == 3 and not session.closed and session.running == 0
        await session.close()


async def test_sigterm_drains_requests_on_a_session(demo_model_dir: Path) -> None:
    """SIGTERM with the gateway's Session stream open: the running request finishes, a new one on
    the same stream is refused with UNAVAILABLE (the gateway then routes it elsewhere), and the
    stream ends when the worker stops."""
    import time

    from services.gateway.request import WorkerFailure
    from services.gateway.session import WorkerSession

    decode = start_service("services.decode", worker_args(demo_model_dir, "--role", "both"))
    async with grpc.aio.insecure_channel(decode.address) as channel:
        session = WorkerSession(worker_pb2_grpc.DecodeWorkerStub(channel), decode.address)
        far = time.perf_counter() + 600  # a deadline no request should reach: a hang guard
        call = session.start(worker_request("s-drained", [4] * 50, 40, []), far)
        tokens: list[int] = []
        while (msg := await call.read()) is not None:
            tokens += msg.token_ids
            if len(tokens) == 1:
                decode.proc.send_signal(15)
                await until_not_serving(channel)
                late = session.start(worker_request("s-late", [4] * 5, 2, []), far)
                with pytest.raises(WorkerFailure) as err:
                    await late.read()
                assert err.value.status == grpc.StatusCode.UNAVAILABLE
        assert len(tokens) == 40  # the in-flight request finished
        assert decode.proc.wait(30) == 0
        await await_until(lambda: session.closed, "the Session stream ended with the worker")
        assert session.running == 0
