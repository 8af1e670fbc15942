"""A real decode worker (and prefill worker) on a tiny model when peers fail: a stalled prefill
worker, falling through the prefill targets, cancels while a prefill or a transfer is outstanding,
and SIGTERM (health, deregistration, drain, and the drain's cut-off).

The misbehaving prefill peers are tests/fake_prefill.py (no real worker stalls on cue); everything
else is real: worker processes, gRPC, gloo, the kvstore over Redis.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from scalellm.redis_server import free_port
from scalellm.registry import RegistryClient, WorkerView
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from tests.fake_prefill import FakePrefill, Mode
from tests.procs import Service, await_until, start_service
from tests.service.worker_calls import (
    generate,
    until_not_serving,
    wait_all_blocks_free,
    worker_args,
    worker_request,
)

pytestmark = pytest.mark.slow

PROMPT = [random.Random(20).randrange(3, 512) for _ in range(40)]
FAR = ("--prefill-timeout", "600", "--transfer-timeout", "600")  # no timeout ends anything here


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens from the engine alone: what every path through the workers must give."""
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine
    from scalellm.types import SamplingParams

    engine = LLMEngine(
        EngineConfig(model=str(tiny_llama), num_kv_blocks=200, dtype="float32")
    )  # as worker_args

    def greedy(prompt: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        req = engine.add_request("expected", prompt, params)
        while engine.has_unfinished():
            engine.step()
        return req.output_token_ids

    return greedy


@pytest.fixture(scope="module")
def decode(tiny_llama: Path) -> Iterator[Service]:
    """A decode worker that waits as long as it takes for its prefill workers."""
    svc = start_service("services.decode", worker_args(tiny_llama, "--role", "decode", *FAR))
    yield svc
    assert svc.stop() == 0, svc.log()


def dead_target() -> worker_pb2.PrefillTarget:
    return worker_pb2.PrefillTarget(worker_id="gone", address=f"127.0.0.1:{free_port()}")


async def test_a_stalled_prefill_worker_times_out_and_the_next_target_serves(
    tiny_llama: Path, engine: Callable[[list[int], int], list[int]]
) -> None:
    """Targets: one nobody listens on (UNAVAILABLE), one that answers Prefill but never sends the KV
    (the transfer timeout), then a real one, whose KV the request decodes from."""
    prefill = start_service("services.prefill", worker_args(tiny_llama, "--worker-id", "real"))
    decode = start_service(
        "services.decode", worker_args(tiny_llama, "--role", "decode", "--transfer-timeout", "5")
    )
    try:
        async with FakePrefill(Mode.STALL) as stalled:
            real = worker_pb2.PrefillTarget(worker_id="real", address=prefill.address)
            targets = [dead_target(), stalled.target("stalled"), real]
            calls = generate(decode.address, [worker_request("fall", PROMPT, 8, targets)])
            [(tokens, last)] = await asyncio.wait_for(calls, 120)  # a hang guard only
        assert tokens == engine(PROMPT, 8)
        assert last.timings.transfer_bytes > 0  # the KV came from the real prefill worker
        assert stalled.answered == 1
        log = decode.log()
        assert "prefill of fall failed: gone: UNAVAILABLE" in log, log
        assert "prefill of fall failed: stalled: TimeoutError" in log, log
        assert "recomputing" not in log
        assert decode.metric("scalellm_kv_transfer_failures_total") == 1  # the stalled one only
        assert prefill.metric('scalellm_requests_total{outcome="prefilled"}') == 1
        await wait_all_blocks_free(decode)
    finally:
        assert decode.stop() == 0, decode.log()
        assert prefill.stop() == 0, prefill.log()


async def test_cancelling_during_the_prefill_call_cancels_it(decode: Service) -> None:
    async with FakePrefill(Mode.HANG) as hung, grpc.aio.insecure_channel(decode.address) as channel:
        call = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(
            worker_request("cancel-prefill", PROMPT, 8, [hung.target("hung")])
        )
        reading = asyncio.ensure_future(call.read())  # nothing comes before the prefill
        await await_until(lambda: len(hung.requests) == 1, "the decode worker called Prefill")
        call.cancel()
        await await_until(lambda: hung.cancelled == 1, "the decode worker cancelled its Prefill call")
        await asyncio.gather(reading, return_exceptions=True)
    await wait_all_blocks_free(decode)


async def test_cancelling_while_the_kv_is_awaited_frees_the_blocks_at_once(decode: Service) -> None:
    """Prefill answered but the KV never comes: a cancel frees the reserved blocks without waiting
    for the transfer timeout (600 s here)."""
    failures = decode.metric("scalellm_kv_transfer_failures_total")
    async with FakePrefill(Mode.STALL) as stalled, grpc.aio.insecure_channel(decode.address) as channel:
        call = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(
            worker_request("cancel-transfer", PROMPT, 8, [stalled.target("stalled")])
        )
        reading = asyncio.ensure_future(call.read())
        await await_until(lambda: stalled.answered == 1, "the stalled prefill worker answered")
        call.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await wait_all_blocks_free(decode)
    assert decode.metric("scalellm_kv_transfer_failures_total") == failures  # cancelled, not timed out


class SilentStore:
    """A port that takes TCP connections and never answers: a KV push to it hangs in the
    rendezvous (until the prefill worker's own 60 s connect timeout), holding its prompt's blocks."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self._held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


async def test_cancelling_a_queued_prefill_aborts_it_on_the_prefill_worker(
    tiny_llama: Path, decode: Service
) -> None:
    """The prefill worker has no KV room (its 8 blocks are held by a push that hangs), so the decode
    worker's prefill waits in its queue; cancelling the request there removes it from that queue."""
    prefill = start_service(
        "services.prefill", worker_args(tiny_llama, "--worker-id", "small", "--num-kv-blocks", "8")
    )
    store = SilentStore()
    try:
        async with grpc.aio.insecure_channel(prefill.address) as to_prefill:
            occupant = worker_pb2_grpc.PrefillWorkerStub(to_prefill).Prefill(
                worker_pb2.PrefillRequest(
                    request_id="occupant",
                    prompt_token_ids=PROMPT * 2 + PROMPT[:20],  # 100 tokens: 7 of 8 blocks
                    sampling=worker_request("", [], 1, []).sampling,
                    destination=worker_pb2.KVDestination(
                        decode_worker_id="nobody", transfer_endpoint=store.address, transfer_id=1,
                        block_ids=list(range(7)),
                    ),
                )
            )  # fmt: skip
            await await_until(
                lambda: prefill.metric("scalellm_kv_blocks_free") <= 1, "the occupant holds the blocks"
            )
            async with grpc.aio.insecure_channel(decode.address) as channel:
                target = worker_pb2.PrefillTarget(worker_id="small", address=prefill.address)
                call = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(
                    worker_request("queued", PROMPT, 8, [target])
                )
                reading = asyncio.ensure_future(call.read())
                await await_until(
                    lambda: prefill.metric("scalellm_queue_depth") == 1, "the prefill waits in the queue"
                )
                call.cancel()
                await asyncio.gather(reading, return_exceptions=True)
            await await_until(
                lambda: prefill.metric("scalellm_queue_depth") == 0, "the queued prefill was aborted"
            )
            await wait_all_blocks_free(decode)
            assert prefill.metric('scalellm_requests_total{outcome="prefilled"}') == 0
            occupant.cancel()
    finally:
        prefill.kill()  # its hung push would hold the stop for the connect timeout
        store.close()


async def test_sigterm_reports_not_serving_deregisters_and_finishes_what_runs(
    tiny_llama: Path, kvstore_address: str, engine: Callable[[list[int], int], list[int]]
) -> None:
    """SIGTERM with a request in flight (its prefill held): health goes NOT_SERVING, the worker leaves
    the registry, new work is refused with UNAVAILABLE, and the held request still finishes."""
    decode = start_service(
        "services.decode",
        worker_args(
            tiny_llama, "--role", "decode", "--worker-id", "leaving", "--kvstore", kvstore_address, *FAR
        ),
    )
    async with (
        WorkerView(RegistryClient(kvstore_address)) as view,
        FakePrefill(Mode.HANG) as hung,
        grpc.aio.insecure_channel(decode.address) as channel,
    ):
        await view.wait_until(lambda s: "leaving" in s.ids, 60)
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        held = asyncio.ensure_future(
            generate(decode.address, [worker_request("held", PROMPT, 8, [hung.target("h")])])
        )
        await await_until(lambda: len(hung.requests) == 1, "the held request reached its prefill")

        decode.proc.send_signal(signal.SIGTERM)
        await until_not_serving(channel)
        await view.wait_until(lambda s: "leaving" not in s.ids, 60)  # deregistered, not expired
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(worker_request("late", PROMPT, 2, [])).read()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "draining" in (err.value.details() or "")

        hung.release.set()  # its prefill fails: the worker recomputes it and finishes it
        [(tokens, _)] = await asyncio.wait_for(held, 60)
        assert tokens == engine(PROMPT, 8)
        await view.client.close()
    assert await asyncio.to_thread(decode.proc.wait, 60) == 0, decode.log()


async def test_sigterm_cuts_off_what_outlives_the_drain_timeout(tiny_llama: Path) -> None:
    """A request that can never finish (its prefill never answers) does not keep a stopping worker
    alive past --drain-timeout: the worker exits, the request fails, its Prefill call is cancelled."""
    decode = start_service(
        "services.decode", worker_args(tiny_llama, "--role", "decode", "--drain-timeout", "0", *FAR)
    )
    async with FakePrefill(Mode.HANG) as hung:
        stuck = asyncio.ensure_future(
            generate(decode.address, [worker_request("stuck", PROMPT, 8, [hung.target("h")])])
        )
        await await_until(lambda: len(hung.requests) == 1, "the request reached its prefill")
        decode.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(decode.proc.wait, 60) == 0, decode.log()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(stuck, 60)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err.value
        await await_until(lambda: hung.cancelled == 1, "the stopping worker cancelled its Prefill call")
