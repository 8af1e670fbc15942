"""`scalellm up --model NAME=PATH` (repeatable): each model's own tiers in the plan, the gateway
told about the others (--add-model), per-model counts, and what is refused before anything starts."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalellm.cli import build_parser
from scalellm.launcher.config import ModelTiers, UpConfig
from scalellm.launcher.plan import WorkerRun, gateway_spec, worker_specs
from services.gateway.config import GatewayConfig


def _up(*argv: str) -> UpConfig:
    args = build_parser().parse_args(["up", *argv])
    assert isinstance(args, argparse.Namespace)
    return UpConfig.from_namespace(args)


def _ports() -> Iterator[int]:
    yield from range(43000, 44000)


def _flags(argv: tuple[str, ...]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}


def test_a_bare_path_keeps_its_meaning() -> None:
    config = _up("--model", "/m", "--served-model-name", "x", "--decode", "2")
    assert (config.model, config.served_model_name, config.decode, config.extra_models) == ("/m", "x", 2, ())


def test_each_model_gets_its_own_tiers_and_the_gateway_serves_them_all() -> None:
    config = _up(
        "--model", "a=/ma", "--model", "b=/mb,decode=3", "--model", "/models/c,prefill=2",
        "--prefill", "1", "--decode", "2", "--threads-per-worker", "1",
    )  # fmt: skip
    assert (config.model, config.served_model_name, config.prefill, config.decode) == ("/ma", "a", 1, 2)
    assert config.extra_models == (
        ModelTiers(name="b", path="/mb", prefill=1, decode=3),
        ModelTiers(name="c", path="/models/c", prefill=2, decode=2),
    )
    assert (config.all_prefill, config.all_decode, config.workers) == (4, 7, 11)
    ports = _ports()
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1", port=lambda: next(ports)), Path("/ma"))
    names = [s.name for s in specs]
    assert names == [
        "prefill-1", "decode-1", "decode-2", "b-prefill-1", "b-decode-1", "b-decode-2", "b-decode-3",
        "c-prefill-1", "c-prefill-2", "c-decode-1", "c-decode-2",
    ]  # fmt: skip
    by_name = {s.name: _flags(s.argv) for s in specs}
    assert (by_name["decode-1"]["--model"], by_name["decode-1"]["--served-model-name"]) == ("/ma", "a")
    assert (by_name["b-decode-3"]["--model"], by_name["b-decode-3"]["--served-model-name"]) == ("/mb", "b")
    assert by_name["c-prefill-2"]["--worker-id"] == "c-prefill-2-r1"
    gateway = list(gateway_spec(config, Path("/ma"), "127.0.0.1:1").argv)
    added = [gateway[i + 1] for i, arg in enumerate(gateway) if arg == "--add-model"]
    assert added == ["b=/mb", "c=/models/c"] and gateway[gateway.index("--served-model-name") + 1] == "a"
    GatewayConfig.from_args(gateway[3:], environ={})  # the gateway takes that command line


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--model", "a=/ma", "--model", "a=/mb"], "each --model needs its own name"),
        (["--model", "a=/ma", "--model", "b=/mb,decode=0"], "needs decode >= 1"),
        (["--model", "a=/ma", "--model", "b=/mb,gpus=2"], "expected NAME=PATH"),
        (["--model", "a=/ma", "--model", "b=/mb", "--autoscale"], "--autoscale plans one model"),
        (["--colocated", "--model", "a=/ma", "--model", "b=/mb,prefill=1"], "0 with --colocated"),
    ],
)
def test_bad_model_lists_are_refused(argv: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _up(*argv)


def test_the_gateway_refuses_added_models_it_cannot_route() -> None:
    with pytest.raises(ValueError, match="--add-model routes by the model workers register under"):
        GatewayConfig(add_models=("b=/mb",), decode_addrs=("127.0.0.1:1",))
    with pytest.raises(ValueError, match="--add-model"):
        GatewayConfig(add_models=("b=/mb",), kvstore=("127.0.0.1:1",), worker_model="*")
