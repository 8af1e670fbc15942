"""A prefill and a decode worker (real processes, a tiny random Llama) that hold a mesh token:
a caller or a KV-transfer peer without it is refused, and the workers' queues and KV cache are
as they were; with the token, requests and KV flow as usual."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scalellm.redis_server import free_port
from scalellm.security import METADATA_KEY
from scalellm.transfer import ChannelConfig, KVLayout, TransferClient, TransferError
from scalellm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.procs import Service, start_service

pytestmark = pytest.mark.slow

TOKEN = "the-mesh-token-of-this-test-0123"
GOOD = ((METADATA_KEY, TOKEN),)
PREFILL_ID = "prefill-tok"


@dataclass
class Pair:
    prefill: Service
    decode: Service


def _args(model: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--listen", "127.0.0.1:0", "--advertise-host", "127.0.0.1",
        "--transfer-listen", "127.0.0.1:0", "--num-kv-blocks", "64", "--num-threads", "1",
        "--metrics-port", str(free_port()), "--transfer-timeout", "10", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_llama: Path) -> Iterator[Pair]:
    env = {"SCALELLM_MESH_TOKEN": TOKEN}  # the environment, as `scalellm up` passes it
    prefill = start_service("services.prefill", _args(tiny_llama, "--worker-id", PREFILL_ID), env=env)
    decode = start_service("services.decode", _args(tiny_llama, "--role", "decode"), env=env)
    yield Pair(prefill, decode)
    assert decode.stop() == 0, decode.log()
    assert prefill.stop() == 0, prefill.log()


def metrics(svc: Service) -> dict[str, float]:
    port = int(re.search(r"metrics on :(\d+)", svc.log()).group(1))  # type: ignore[union-attr]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(scalellm_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def untouched(svc: Service) -> bool:
    """Nothing queued, nothing running, every KV block free, no request ever finished."""
    m = metrics(svc)
    idle = m["scalellm_queue_depth"] == 0 and m["scalellm_running_batch"] == 0
    finished = sum(v for k, v in m.items() if k.startswith("scalellm_requests_total"))
    return idle and m["scalellm_kv_blocks_free"] == m["scalellm_kv_blocks_total"] and finished == 0


def request(rid: str, targets: list[worker_pb2.PrefillTarget]) -> worker_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return worker_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=list(range(3, 40)), sampling=sampling, prefill=targets
    )


async def generate(address: str, req: worker_pb2.GenerateRequest, metadata=GOOD) -> list[int]:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(address) as channel:
        return [
            t
            async for m in worker_pb2_grpc.DecodeWorkerStub(channel).Generate(req, metadata=metadata)
            for t in m.token_ids
        ]


async def test_calls_without_the_token_are_refused_and_change_nothing(pair: Pair) -> None:
    targets = [worker_pb2.PrefillTarget(worker_id=PREFILL_ID, address=pair.prefill.address)]
    for metadata in ((), ((METADATA_KEY, "not-the-token-at-all"),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(pair.decode.address, request("intruder", targets), metadata)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(pair.prefill.address) as channel:
        prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
        call = prefill.Prefill(worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[5, 6]), timeout=10)
        assert await call.code() is grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    assert untouched(pair.decode) and untouched(pair.prefill)
    refused = metrics(pair.decode)
    assert refused['scalellm_mesh_auth_failures_total{reason="missing"}'] == 1
    assert refused['scalellm_mesh_auth_failures_total{reason="invalid"}'] == 1
    assert metrics(pair.prefill)['scalellm_mesh_auth_failures_total{reason="missing"}'] == 1


async def test_with_the_token_kv_moves_and_a_transfer_peer_without_it_is_refused(pair: Pair) -> None:
    targets = [worker_pb2.PrefillTarget(worker_id=PREFILL_ID, address=pair.prefill.address)]
    first = await generate(pair.decode.address, request("one", targets))
    assert len(first) == 6
    before = metrics(pair.decode)
    assert before['scalellm_kv_transfer_bytes_total{direction="in"}'] > 0  # over the authenticated pair

    # Someone without the token poses as the prefill worker on the decode worker's rendezvous.
    transfer = re.search(r"KV transfer on (\S+?),", pair.decode.log()).group(1)  # type: ignore[union-attr]
    decode_id = re.search(r"decode (\S+) serving on", pair.decode.log()).group(1)  # type: ignore[union-attr]
    cache = torch.zeros(8, 3, 2, 16, 2, 16)
    layout = KVLayout.from_kv_cache(cache, "tiny")
    intruder = TransferClient(
        PREFILL_ID, layout, cache, ChannelConfig(connect_timeout_s=3, device_host="127.0.0.1")
    )
    try:
        with pytest.raises(TransferError):
            intruder.send_kv(decode_id, transfer, 1, [0], [0], 1)
    finally:
        intruder.close()
    after = metrics(pair.decode)
    assert after["scalellm_kv_transfer_refused_total"] >= 1
    assert after["scalellm_kv_blocks_free"] == after["scalellm_kv_blocks_total"]
    assert await generate(pair.decode.address, request("two", targets)) == first  # the real pair still works
    assert (
        metrics(pair.decode)['scalellm_kv_transfer_bytes_total{direction="in"}']
        > before['scalellm_kv_transfer_bytes_total{direction="in"}']
    )
