"""`scalellm up --autoscale`: the planner grows the decode tier under a flood and shrinks it after,
with no failed request (tiny random model, short planner windows given by flags). The mesh runs
with the mesh token and Redis password `scalellm up` generates; every socket of every process,
the planner's and the added worker's included, is on loopback."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc

from scalellm.launcher.config import UpConfig
from scalellm.launcher.plan import WorkerRun, planner_spec, worker_spec
from scalellm.launcher.probes import http_health
from tests.e2e.test_up import (
    Up,
    _alive,
    _assert_gone,
    _assert_no_call_was_refused,
    _assert_nothing_beyond_loopback,
    _assert_secret_only_in_environment,
    _child_pid,
    _mesh_token_of,
)
from tests.sockets import listening

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@pytest.fixture(scope="module")
def tiny_served(tiny_llama: Path, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with the demo model's tokenizer files (the gateway needs a tokenizer;
    requests send token ids below the tiny vocabulary)."""
    folder = tmp_path_factory.mktemp("tiny-served")
    for item in tiny_llama.iterdir():
        shutil.copy(item, folder / item.name)
    for name in TOKENIZER_FILES:
        if (demo_model_dir / name).exists():
            shutil.copy(demo_model_dir / name, folder / name)
    return folder


class Load:
    """Closed-loop OpenAI clients, each sending one request after another until stopped."""

    def __init__(self, base_url: str, clients: int, max_tokens: int) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        self.max_tokens = max_tokens
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        i = 0
        while not self._stop.is_set():
            prompt = [(seed * 31 + i * 7 + k) % 400 + 10 for k in range(20)]
            try:
                out = self.client.completions.create(
                    model="", prompt=prompt, max_tokens=self.max_tokens, temperature=0
                )
                assert out.choices[0].finish_reason in ("length", "stop"), out
                self.done += 1
            except Exception as exc:  # every failure counts; none is expected
                self.failures.append(repr(exc))
            i += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


def _reflection_code(address: str) -> grpc.StatusCode:
    """What the planner's gRPC server answers a reflection call without the mesh token."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:  # nothing written: the refusal cannot race a write (which would read as INTERNAL)
            list(stub.ServerReflectionInfo(iter([]), timeout=10))
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _assert_the_planner_is_one_of_the_mesh(up: Up, pids: dict[int, str]) -> None:
    """Its two listeners (gRPC health, /metrics) are on loopback, it holds the run's generated
    token like every other service, and its gRPC server refuses callers without it."""
    planner = _child_pid(up, "planner")
    assert planner in _alive(pids), up.log()
    ready = re.search(r"ready planner 127\.0\.0\.1:(\d+) .*metrics=http://127\.0\.0\.1:(\d+)/", up.log())
    assert ready is not None, up.log()
    grpc_port, metrics_port = int(ready.group(1)), int(ready.group(2))
    assert listening(planner) == {("127.0.0.1", grpc_port), ("127.0.0.1", metrics_port)}
    token = _mesh_token_of(planner)
    assert len(token) >= 32, "the planner child has no mesh token in its environment"
    _assert_secret_only_in_environment(pids, token, services=6)  # kvstore, 1 + 2 workers, gateway, planner
    assert _reflection_code(f"127.0.0.1:{grpc_port}") is grpc.StatusCode.UNAUTHENTICATED


def _wait(condition: Callable[[], bool], up: Up, what: str, timeout: float = 180.0) -> None:
    """Poll a condition; the timeout is a hang guard only."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert up.proc.poll() is None, f"scalellm up exited {up.proc.returncode}:\n{up.log()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{up.log()}"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-decode", "2"],  # needs --autoscale
        ["--autoscale", "--decode", "2", "--max-decode", "1"],  # max below min
        ["--autoscale", "--colocated", "--max-prefill", "1"],
        ["--autoscale", "--planner-arg=--up-window-s=-1"],  # the planner's own check
        ["--autoscale", "--planner-arg=--no-such-flag"],
    ],
)
def test_bad_autoscale_flags_are_refused_before_anything_starts(argv: list[str], tmp_path: Path) -> None:
    from scalellm.cli import main

    (tmp_path / "config.json").write_text("{}")  # a model folder: nothing is loaded before the check
    with pytest.raises(SystemExit) as exc:
        main(["up", "--model", str(tmp_path), "--http-port", "0", "--grpc-port", "0", *argv])
    assert exc.value.code == 2


def test_the_planner_child_plans_this_mesh_within_its_limits() -> None:
    config = UpConfig(prefill=1, decode=1, autoscale=True, max_decode=3, planner_args=("--interval-s=1",))
    argv = list(planner_spec(config, "127.0.0.1:9", "smol", port=lambda: 4242).argv)
    assert argv[:3] == [sys.executable, "-m", "services.planner"] and argv[-1] == "--interval-s=1"
    flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert (flag["--kvstore"], flag["--model"], flag["--metrics-port"]) == ("127.0.0.1:9", "smol", "4242")
    assert [flag[f"--{e}-{t}"] for t in ("prefill", "decode") for e in ("min", "max")] == ["1", "1", "1", "3"]
    assert config.worker_threads(cores=8) == 2  # cores shared out for the largest mesh (1 + 3)
    # GPUs go by slot in the largest mesh, so decode-2 keeps its GPU whenever it is started
    gpus = UpConfig(
        prefill=1, decode=1, autoscale=True, max_prefill=2, max_decode=2, gpus=("0", "1", "2", "3")
    )
    spec = worker_spec(WorkerRun(gpus, "127.0.0.1:9", "r", port=lambda: 1), Path("/m"), "decode", 2)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "3" and spec.restart


@pytest.mark.slow
def test_decode_grows_under_a_flood_and_shrinks_after_it_with_no_failed_request(tiny_served: Path) -> None:
    up = Up(
        "--model", str(tiny_served), "--http-port", "0", "--grpc-port", "0", "--quiet",
        "--autoscale", "--max-decode", "2", "--max-num-seqs", "4", "--num-kv-blocks", "256",
        "--startup-timeout", "120", "--drain-timeout", "30",
        "--planner-arg=--interval-s=0.25", "--planner-arg=--up-window-s=1", "--planner-arg=--up-cooldown-s=0",
        "--planner-arg=--down-window-s=3", "--planner-arg=--down-cooldown-s=3",
        env={"SCALELLM_MESH_TOKEN": None, "SCALELLM_MESH_TOKEN_FILE": None},  # the run makes its own
    )  # fmt: skip
    pids: dict[int, str] = {}
    trickle: Load | None = None
    flood: Load | None = None
    try:
        ready = up.wait_for("mesh ready: ", timeout=150)
        base_url = ready.split()[2]
        health = base_url.removesuffix("/v1") + "/health"

        def decode_workers() -> int:
            return int((http_health(health) or {}).get("decode_workers", -1))

        assert decode_workers() == 1
        trickle = Load(base_url, clients=1, max_tokens=16)  # runs throughout, across both changes
        flood = Load(base_url, clients=12, max_tokens=48)
        _wait(lambda: decode_workers() == 2, up, "second decode worker in the gateway's view")
        assert any(re.match(r"scalellm up: planner: decode 1 -> 2 \(need [\d.]+ workers\)$", line)
                   for line in up.lines), up.log()  # fmt: skip
        served_before = flood.done
        _wait(lambda: flood.done > served_before + 12, up, "requests served with two decode workers")
        assert "scalellm up: internal calls need this run's mesh token" in up.log()
        pids = up.pids()  # every process at the largest: decode-2 (the planner's) included
        _assert_nothing_beyond_loopback(up, pids, at_least=15)  # + the planner's gRPC and metrics
        _assert_the_planner_is_one_of_the_mesh(up, pids)
        flood.stop()

        _wait(lambda: decode_workers() == 1, up, "the decode tier back to one worker")
        _wait(lambda: any("drained and stopped (status 0)" in line for line in up.lines), up, "drain")
        drained = next(line for line in up.lines if "drained and stopped" in line)
        assert drained.startswith("scalellm up: decode-2 (pid "), drained
        assert not any("restarting it" in line for line in up.lines), up.log()  # not taken for a crash
        served_before = trickle.done
        _wait(lambda: trickle.done > served_before + 2, up, "requests served after the drain")
        trickle.stop()

        assert flood.failures == [] and trickle.failures == [], (flood.failures[:3], trickle.failures[:3])
        assert flood.done > 0 and trickle.done > 0
        _assert_no_call_was_refused(up)
        pids |= up.pids()
        addresses = up.addresses()
        assert up.stop() == 0, up.log()
        _assert_gone(up, pids, addresses)
    finally:
        for load in (flood, trickle):
            if load is not None:
                load.stop()
        up.cleanup(pids)
