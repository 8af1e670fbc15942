"""The gateway's model lanes: another model's tokenizer is loaded once, on first use, however
many requests ask at once; names and folders find their lane; anything else is 404
model_not_found naming what is served; each lane routes over its own workers only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scalellm.registry import WorkerRole
from services.gateway.admission import ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.request import ErrorKind, GatewayError
from services.gateway.routing import StaticWorkers, WorkerSource
from services.gateway.tenants import ANONYMOUS, Tenant


async def test_lanes_load_lazily_once_and_route_over_their_own_workers(demo_model_dir: Path) -> None:
    config = GatewayConfig(
        model=str(demo_model_dir), served_model_name="a", add_models=(f"b={demo_model_dir}",)
    )
    sources: dict[str, WorkerSource] = {"b": StaticWorkers(["wb=127.0.0.1:2"])}
    core = GatewayCore(
        config,
        ServedModel(demo_model_dir, config),
        StaticWorkers(["wa=127.0.0.1:1"]),
        source_for=sources.__getitem__,
    )
    try:
        lane_b = core.catalog.lanes["b"]
        assert lane_b.loaded is None and lane_b.limits == core.model.limits  # the card needs no tokenizer
        (lb1, b1), (lb2, b2) = await asyncio.gather(core.lane("b", ANONYMOUS), core.lane("b", ANONYMOUS))
        assert lb1 is lb2 is lane_b and b1 is b2 is lane_b.loaded and b1.name == "b"
        assert (await core.lane(None, ANONYMOUS))[1] is core.model  # the default
        assert core.find(str(demo_model_dir), ANONYMOUS).name == "a"  # the default's folder
        route = lane_b.router.route(8)
        assert route is not None and route.decode.worker_id == "wb" and route.decode.role is WorkerRole.BOTH
        assert core.router.route(8).decode.worker_id == "wa"  # type: ignore[union-attr]
        with pytest.raises(GatewayError, match="this gateway serves 'a', 'b'") as unknown:
            core.find("c", ANONYMOUS)
        assert unknown.value.kind is ErrorKind.NOT_FOUND and unknown.value.code == "model_not_found"
        with pytest.raises(GatewayError, match="tenant 'only-a' may not use it"):
            core.find("b", Tenant(name="only-a", models=frozenset({"a"})))
        assert [lane.name for lane in core.lanes_for(Tenant(name="x", models=frozenset({"b"})))] == ["b"]
    finally:
        await core.close()


async def test_a_model_that_cannot_load_is_503_and_retried(demo_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((demo_model_dir / "config.json").read_text())  # no tokenizer
    config = GatewayConfig(model=str(demo_model_dir), add_models=(f"b={broken}",))
    core = GatewayCore(
        config, ServedModel(demo_model_dir, config), StaticWorkers(["w=127.0.0.1:1"]),
        source_for=lambda name: StaticWorkers(["wb=127.0.0.1:2"]),
    )  # fmt: skip
    try:
        with pytest.raises(GatewayError, match="the model 'b' could not be loaded") as failed:
            await core.lane("b", ANONYMOUS)
        assert failed.value.kind is ErrorKind.UNAVAILABLE
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (broken / name).write_bytes((demo_model_dir / name).read_bytes())
        assert (await core.lane("b", ANONYMOUS))[1].name == "b"  # the next request tries again
    finally:
        await core.close()
