"""Tenants: the keys file's fields, each limit exactly at its bound (a clock stepped by the test),
the fair admission queue, and the limits through both front ends (429 with Retry-After, gRPC
RESOURCE_EXHAUSTED) with per-tenant usage in /metrics. In-process gateway over scripted decode
workers (tests/unit/test_gateway_server.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import grpc
import pytest

from scalellm.types import FairShares, TenantShare
from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admission import ApiKeys
from services.gateway.admission_queue import AdmissionQueue
from services.gateway.request import ErrorKind, GatewayError
from services.gateway.tenants import RateLimited, Tenant, TenantLimiter
from tests.unit.test_gateway_server import (
    REPLY,
    Mesh,
    MeshFactory,
    wait_for,
)


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# -- the keys file ---------------------------------------------------------------------------------


def test_keys_file_fields(tmp_path: Path) -> None:
    keys = ApiKeys.load(
        keys_file(
            tmp_path,
            "sk-a acme weight=2 max_concurrency=3 rpm=10 tpm=500 models=m1,m2\n"
            "sk-a2 acme\n"  # shares acme's fields
            "sk-b bravo isolate_cache=yes\n"
            "sk-c weight=0.5\n",  # tenant 'default' with a field
        )
    )
    acme = keys.lookup("Bearer sk-a")
    assert acme == Tenant(
        name="acme", weight=2.0, max_concurrency=3, rpm=10, tpm=500, models=frozenset({"m1", "m2"})
    )
    assert keys.lookup("Bearer sk-a2") is acme and keys.tenant("Bearer sk-a2") == "acme"
    assert keys.lookup("Bearer sk-b") == Tenant(name="bravo", isolate_cache=True)
    assert keys.lookup("Bearer sk-c") == Tenant(name="default", weight=0.5)
    assert [t.name for t in keys.all_tenants()] == ["acme", "bravo", "default"]
    assert acme.may_use("m1") and not acme.may_use("m3") and Tenant(name="x").may_use("m3")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sk-a acme weight=0\n", "weight must be a positive number"),
        ("sk-a acme rpm=0\n", "rpm must be >= 1"),
        ("sk-a acme rpm=ten\n", "rpm must be an integer"),
        ("sk-a acme color=red\n", "expected one of weight=..."),
        ("sk-a acme rpm=1 rpm=2\n", "rpm given twice"),
        ("sk-a acme rpm=1\nsk-b acme rpm=2\n", "different fields on different lines"),
        ("sk-a acme isolate_cache=true\n", "isolate_cache must be yes or no"),
    ],
)
def test_bad_keys_file_fields_are_refused(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ApiKeys.load(keys_file(tmp_path, text))


# -- the limiter, at its bounds -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_concurrency_admits_exactly_n() -> None:
    limiter, tenant = TenantLimiter(Clock()), Tenant(name="t", max_concurrency=2)
    limiter.admit(tenant)
    limiter.admit(tenant)
    with pytest.raises(RateLimited, match="tenant 't' has 2 requests in flight") as refused:
        limiter.admit(tenant)
    assert refused.value.kind is ErrorKind.OVERLOADED and refused.value.retry_after == 1
    assert limiter.in_flight(tenant) == 2  # the refusal counted nothing
    limiter.release(tenant)
    limiter.admit(tenant)
    assert limiter.in_flight(tenant) == 2


def test_rpm_admits_exactly_n_in_a_sliding_minute() -> None:
    clock = Clock()
    limiter, tenant = TenantLimiter(clock), Tenant(name="t", rpm=3)
    for step in (0.0, 10.0, 20.0):  # admitted at 1000, 1010, 1020
        clock.now += step and 10.0
        limiter.admit(tenant)
        limiter.release(tenant)
    clock.now = 1030.5
    with pytest.raises(RateLimited, match=r"rpm=3\); retry after 30 s") as refused:
        limiter.admit(tenant)
    assert refused.value.retry_after == 30  # ceil(1000 + 60 - 1030.5)
    clock.now = 1059.999
    with pytest.raises(RateLimited):
        limiter.admit(tenant)
    clock.now = 1060.0  # the first admission leaves the window
    limiter.admit(tenant)
    with pytest.raises(RateLimited):
        limiter.admit(tenant)


def test_tpm_counts_tokens_exactly_to_its_bound() -> None:
    clock = Clock()
    limiter, tenant = TenantLimiter(clock), Tenant(name="t", tpm=100)
    limiter.charge_tokens(tenant, 60)
    clock.now += 5
    limiter.charge_tokens(tenant, 40)  # exactly 100
    with pytest.raises(RateLimited, match="used 100 of its 100 tokens") as refused:
        limiter.charge_tokens(tenant, 1)
    assert refused.value.retry_after == 55  # the 60 leave at 1060
    clock.now = 1060.0
    limiter.charge_tokens(tenant, 60)
    with pytest.raises(GatewayError, match="more than tenant 't' may use in a minute") as too_big:
        limiter.charge_tokens(tenant, 101)
    assert too_big.value.kind is ErrorKind.INVALID


# -- fair shares and the admission queue -----------------------------------------------------------


def test_fair_shares_follow_weights_and_bank_no_credit() -> None:
    shares, a, b = FairShares(), TenantShare("a", 2.0), TenantShare("b", 1.0)
    order = []
    for _ in range(9):
        pick = shares.pick(["a", "b"])
        assert pick is not None
        shares.charge(a if pick == "a" else b)
        order.append(pick)
    assert order.count("a") == 6 and order.count("b") == 3
    assert order[:3].count("a") == 2  # interleaved, not a run of a's
    for _ in range(20):  # b alone for a while
        shares.charge(b)
    order = []
    for _ in range(6):  # a was idle: it starts from now, not from 20 requests behind
        pick = shares.pick(["b", "a"])
        shares.charge(a if pick == "a" else b)
        order.append(pick)
    assert order.count("a") == 4 and order.count("b") == 2, order


async def test_admission_queue_serves_waiting_tenants_by_weight() -> None:
    queue = AdmissionQueue(limit=1, max_queued=100)
    flood, other = TenantShare("flood", 1.0), TenantShare("other", 1.0)
    assert queue.try_enter(flood)
    admitted: list[str] = []

    async def wait(share: TenantShare) -> None:
        await queue.wait(share)
        admitted.append(share.name)

    tasks = [asyncio.create_task(wait(flood)) for _ in range(6)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(wait(other)) for _ in range(2)]
    await asyncio.sleep(0)
    assert queue.queued == 8 and queue.can_wait()
    for _ in range(8):
        queue.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    # "other" arrived after all six of flood's, yet it is not served last.
    assert admitted[:4].count("other") == 2, admitted
    assert queue.running == 1 and queue.queued == 0
    queue.leave()
    assert queue.running == 0


async def test_a_cancelled_waiter_leaves_its_line_and_passes_a_slot_on() -> None:
    queue = AdmissionQueue(limit=1, max_queued=2)
    share = TenantShare("t")
    assert queue.try_enter(share)
    first = asyncio.create_task(queue.wait(share))
    second = asyncio.create_task(queue.wait(share))
    await asyncio.sleep(0)
    assert not queue.can_wait()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert queue.queued == 1
    queue.leave()  # the slot goes to the second waiter
    await second
    assert queue.running == 1 and queue.queued == 0


# -- through the front ends --------------------------------------------------------------------------


async def _post(session: aiohttp.ClientSession, mesh: Mesh, key: str) -> aiohttp.ClientResponse:
    return await session.post(
        mesh.http + "/v1/completions",
        json={"prompt": "x", "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_limits_answer_429_with_retry_after_and_usage_is_per_tenant(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    path = keys_file(
        tmp_path, "sk-a acme max_concurrency=2 weight=2.5\nsk-b bravo tpm=40\nsk-c carol models=other\n"
    )
    mesh = await mesh_factory(api_keys_file=str(path), worker_kw=[{"hold_after": 1}])
    worker = mesh.workers[0]
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(_post(session, mesh, "sk-a")) for _ in range(2)]
        await wait_for(lambda: len(worker.requests) == 2)
        # The worker learns whose request it is, for its own fair queue.
        assert [(r.tenant, r.tenant_weight) for r in worker.requests] == [("acme", 2.5)] * 2
        refused = await _post(session, mesh, "sk-a")
        assert refused.status == 429 and refused.headers["Retry-After"] == "1"
        body = await refused.json()
        assert "tenant 'acme'" in body["error"]["message"] and body["error"]["type"] == "rate_limit_error"
        assert body["error"]["code"] == "rate_limit_exceeded"

        async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Generate(
                gateway_pb2.GatewayGenerateRequest(text="x"), metadata=(("authorization", "Bearer sk-a"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                _ = [m async for m in call]
            assert grpc_refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant 'acme'" in (grpc_refused.value.details() or "")
            assert ("retry-after", "1") in tuple(grpc_refused.value.trailing_metadata() or ())

        worker.release.set()  # (every stream of the scripted worker holds until then)
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        assert (await _post(session, mesh, "sk-a")).status == 200  # a slot is free again

        # bravo's tpm of 40: prompt + max_tokens 4 per request.
        ok = await _post(session, mesh, "sk-b")
        assert ok.status == 200
        prompt = len(worker.requests[-1].prompt_token_ids)
        admitted = 1
        while (admitted + 1) * (prompt + 4) <= 40:
            assert (await _post(session, mesh, "sk-b")).status == 200
            admitted += 1
        over = await _post(session, mesh, "sk-b")
        assert over.status == 429 and int(over.headers["Retry-After"]) >= 1
        assert "tenant 'bravo'" in (await over.json())["error"]["message"]

        wrong_model = await _post(session, mesh, "sk-c")
        assert wrong_model.status == 404 and (await wrong_model.json())["error"]["code"] == "model_not_found"
        metrics = await (
            await session.get(mesh.http + "/metrics", headers={"Authorization": "Bearer sk-a"})
        ).text()
    assert 'scalellm_gateway_rate_limited_total{limit="max_concurrency",tenant="acme"} 2.0' in metrics
    assert 'scalellm_gateway_rate_limited_total{limit="tpm",tenant="bravo"} 1.0' in metrics
    assert 'scalellm_gateway_tenant_requests_total{tenant="acme"} 3.0' in metrics
    assert f'scalellm_gateway_tenant_requests_total{{tenant="bravo"}} {admitted + 1}.0' in metrics
    assert (
        f'scalellm_gateway_tenant_tokens_total{{kind="prompt",tenant="bravo"}} {admitted * prompt}.0'
        in metrics
    )
    assert 'scalellm_gateway_tenant_requests_in_flight{tenant="acme"} 0.0' in metrics


async def test_at_the_bound_requests_wait_in_the_fair_queue(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    path = keys_file(tmp_path, "sk-a acme\nsk-b bravo\n")
    mesh = await mesh_factory(
        api_keys_file=str(path), max_inflight=1, max_queued=1, worker_kw=[{"hold_after": 1}]
    )
    worker = mesh.workers[0]
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_post(session, mesh, "sk-a"))
        await wait_for(lambda: len(worker.requests) == 1)
        queued = asyncio.create_task(_post(session, mesh, "sk-b"))
        await wait_for(lambda: mesh.gateway.core.admission.queued == 1)
        refused = await _post(session, mesh, "sk-a")  # the queue is full too
        assert refused.status == 429 and refused.headers["Retry-After"] == "1"
        worker.release.set()
        assert (await first).status == 200 and (await queued).status == 200
    assert REPLY.startswith("Hello")


async def test_cache_salts_are_namespaced_by_tenant(mesh_factory: MeshFactory, tmp_path: Path) -> None:
    """No tenant can name another's salt: the same client salt reaches the workers as a different
    salt per tenant; isolate_cache salts a tenant's every request; other requests carry none."""
    mesh = await mesh_factory(
        api_keys_file=str(keys_file(tmp_path, "sk-a acme\nsk-b bravo isolate_cache=yes\n"))
    )
    worker = mesh.workers[0]
    sent = [("sk-a", None), ("sk-a", "s1"), ("sk-b", "s1"), ("sk-b", None), ("sk-a", "s1")]
    async with aiohttp.ClientSession() as session:
        for key, salt in sent:
            body = {"prompt": "x", "max_tokens": 2, **({"cache_salt": salt} if salt else {})}
            async with session.post(
                mesh.http + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status == 200, await r.text()
    salts = [r.sampling.cache_salt if r.sampling.HasField("cache_salt") else None for r in worker.requests]
    assert salts[0] is None  # acme asked for none
    assert salts[1] and salts[1] != "s1" and salts[1] == salts[4]  # acme's s1, the same each time
    assert salts[2] and salts[2] != salts[1]  # bravo's s1 is not acme's
    assert salts[3] and salts[3] not in (salts[1], salts[2])  # bravo isolated even without one
