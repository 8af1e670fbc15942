"""Stream migration: a choice whose decode worker fails mid-stream continues on another worker
from the tokens already sent, on both APIs (scripted workers: test_gateway_server.py). The exact
continuation on real engines is tested in tests/e2e/test_chaos.py and test_engine_exact.py."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.unit.test_gateway_server import (
    REPLY,
    Mesh,
    MeshFactory,
    wait_for,
)

HELD = 3  # tokens a worker sends before it dies


def _timed(text: str) -> gateway_pb2.GatewayGenerateRequest:
    return gateway_pb2.GatewayGenerateRequest(text=text, sampling=common_pb2.SamplingParams(max_tokens=100))


async def _metric(mesh: Mesh, name: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(mesh.http + "/metrics") as resp:
        return "\n".join(line for line in (await resp.text()).splitlines() if line.startswith(name))


async def test_a_dying_workers_stream_continues_on_another(mesh_factory: MeshFactory) -> None:
    """gRPC: the worker dies after HELD tokens; the client gets the whole reply once, in order."""
    mesh = await mesh_factory(workers=2, worker_kw=[{"hold_after": HELD}, {"hold_after": HELD}])
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(_timed("x"))
        first = await call.read()
        await wait_for(lambda: sum(w.sent for w in mesh.workers) == HELD)
        dying = next(i for i, w in enumerate(mesh.workers) if w.requests)
        survivor = mesh.workers[1 - dying]
        survivor.release.set()
        await mesh.servers[dying].stop(0)  # the worker dies with the stream held
        rest = []
        while (message := await asyncio.wait_for(call.read(), 60)) is not grpc.aio.EOF:  # hang guard
            rest.append(message)
    messages = [first, *rest]
    assert "".join(m.text for m in messages) == REPLY
    assert [t for m in messages for t in m.token_ids] == [*mesh.reply_ids, 2]  # none repeated, none lost
    (resumed,) = survivor.requests
    assert list(resumed.resume_token_ids) == mesh.reply_ids[:HELD] and not resumed.prefill
    last = messages[-1]
    assert last.timings.migrations == 1
    assert last.usage.completion_tokens == len(mesh.reply_ids) + 1
    assert 'reason="unavailable"} 1.0' in await _metric(mesh, "scalellm_gateway_migrations_total")
    await wait_for(lambda: mesh.gateway.core.in_flight == 0)
    assert mesh.gateway.core.router.inflight("w0") == mesh.gateway.core.router.inflight("w1") == 0


async def test_a_draining_workers_abort_migrates_on_http(mesh_factory: MeshFactory) -> None:
    """HTTP streaming: each worker aborts its first stream after 4 tokens (a drain cut-off), so
    the choice moves twice (A -> B, which aborts at once -> A) and still reads as one stream."""
    mesh = await mesh_factory(workers=2, worker_kw=[{"abort_after": 4}, {"abort_after": 4}])
    for worker in mesh.workers:
        worker.abort_once = True
    stream = await mesh.client().chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_headers={"x-scalellm-timings": "1"},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].model_extra["timings"]["migrations"] == 2
    assert 'reason="aborted"} 2.0' in await _metric(mesh, "scalellm_gateway_migrations_total")


async def test_the_migration_limit_bounds_the_moves(mesh_factory: MeshFactory) -> None:
    """Workers that abort every stream after 4 tokens: the choice moves --migration-limit times,
    then fails with UNAVAILABLE; with a limit of 0 it fails at the first abort."""
    for limit in (2, 0):
        mesh = await mesh_factory(
            workers=2, worker_kw=[{"abort_after": 4}, {"abort_after": 4}], migration_limit=limit
        )
        # Resumed at 4, a worker aborts at once: every move after the first fails straight away.
        async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(_timed("x"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_drain(call), 60)  # a hang guard only
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        assert sum(len(w.requests) for w in mesh.workers) == limit + 1
        moves = await _metric(mesh, "scalellm_gateway_migrations_total")
        assert (f'reason="aborted"}} {float(limit)}' in moves) if limit else "reason=" not in moves


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _ in call:
        pass
