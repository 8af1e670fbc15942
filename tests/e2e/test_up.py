"""`scalellm up`: the plan it runs (fast), then the whole mesh as a subprocess on CPU (slow):
Redis, kvstore, 2 prefill and 2 decode workers and the gateway serve 32 concurrent OpenAI requests
spread over every worker; SIGTERM stops everything in order and leaves no process or port behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from scalellm.launcher.config import UpConfig
from scalellm.launcher.plan import Secrets, WorkerRun, gateway_spec, kvstore_spec, redis_spec, worker_specs
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from tests.procs import ROOT, whole_machine
from tests.sockets import is_loopback, listening

MODEL = "SmolLM2-135M-Instruct"
CHILDREN = {"redis", "kvstore", "prefill-1", "prefill-2", "decode-1", "decode-2", "gateway"}


# ---------------------------------------------------------------- the plan (no processes)


def _ports() -> Iterator[int]:
    yield from range(41000, 42000)


def test_plan_uses_each_service_entry_point_and_divides_cores() -> None:
    config = UpConfig(
        prefill=2, decode=2, num_kv_blocks=64, worker_args=("--max-num-seqs=8",), gateway_args=("--max-n=2",)
    )
    ports = _ports()
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1", port=lambda: next(ports)), Path("/m"))
    assert [s.name for s in specs] == ["prefill-1", "prefill-2", "decode-1", "decode-2"]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 4))
    for spec in specs:
        argv = list(spec.argv)
        assert argv[:3] == [sys.executable, "-m", f"services.{spec.name.split('-')[0]}"]
        flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
        assert flag["--role"] == spec.name.split("-")[0] and flag["--worker-id"] == f"{spec.name}-r1"
        assert (flag["--num-threads"], spec.env["OMP_NUM_THREADS"]) == (threads, threads)
        assert (flag["--kvstore"], flag["--model"], flag["--num-kv-blocks"]) == ("127.0.0.1:1", "/m", "64")
        assert argv[-1] == "--max-num-seqs=8"
    assert len({s.metrics for s in specs}) == 4
    kvstore = kvstore_spec("redis://:pw@x:1/0")
    assert kvstore.argv[:3] == (sys.executable, "-m", "services.kvstore")
    assert "pw" not in " ".join(kvstore.argv) and kvstore.env["SCALELLM_REDIS_URL"] == "redis://:pw@x:1/0"
    assert redis_spec("pw").env == {"SCALELLM_REDIS_PASSWORD": "pw"} and "pw" not in repr(redis_spec("pw"))
    gateway = list(gateway_spec(config, Path("/m"), "127.0.0.1:1").argv)
    assert gateway[:3] == [sys.executable, "-m", "services.gateway"] and gateway[-1] == "--max-n=2"
    assert gateway[gateway.index("--kvstore") + 1] == "127.0.0.1:1"


def test_the_mesh_token_is_generated_unless_given() -> None:
    fresh, other = Secrets.for_run({}), Secrets.for_run({})
    assert fresh.generated_token and len(fresh.mesh["SCALELLM_MESH_TOKEN"]) >= 32
    assert fresh.mesh != other.mesh and fresh.redis_password != other.redis_password
    assert fresh.mesh["SCALELLM_MESH_TOKEN"] not in repr(fresh)
    for given in ({"SCALELLM_MESH_TOKEN": "x" * 20}, {"SCALELLM_MESH_TOKEN_FILE": "/run/secrets/t"}):
        assert Secrets.for_run(given).mesh == {}  # the children inherit the user's


def test_colocated_runs_workers_with_role_both_and_no_prefill() -> None:
    config = UpConfig(prefill=0, decode=3, colocated=True, threads_per_worker=2, gpus=("0", "1"))
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1"), Path("/m"))
    assert [s.argv[s.argv.index("--role") + 1] for s in specs] == ["both"] * 3
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1", "0"]
    assert UpConfig(prefill=1, decode=4).worker_threads(cores=16) == 3


def test_tensor_parallel_workers_get_the_flag_and_a_share_of_cores_per_rank() -> None:
    config = UpConfig(prefill=0, decode=2, colocated=True, tensor_parallel_size=2)
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1"), Path("/m"))
    assert all(s.argv[s.argv.index("--tensor-parallel-size") + 1] == "2" for s in specs)
    assert config.worker_threads(cores=16) == 4  # 2 workers x 2 ranks
    assert (
        "--tensor-parallel-size"
        not in worker_specs(WorkerRun(UpConfig(), "127.0.0.1:1", "r1"), Path("/m"))[0].argv
    )


def _tp_by_worker(config: UpConfig) -> dict[str, str]:
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1"), Path("/m"))
    return {
        s.name: dict(zip(s.argv, s.argv[1:], strict=False)).get("--tensor-parallel-size", "1") for s in specs
    }


def test_each_disaggregated_tier_takes_its_own_tensor_parallel_size() -> None:
    """--prefill-tp / --decode-tp size each tier (any pair: KV is re-sharded in the transfer);
    --tensor-parallel-size alone sizes both; the cores are shared over every rank."""
    both = UpConfig(prefill=1, decode=2, tensor_parallel_size=2)
    assert _tp_by_worker(both) == {"prefill-1": "2", "decode-1": "2", "decode-2": "2"}
    assert both.worker_threads(cores=12) == 2  # 3 workers x 2 ranks
    split = UpConfig(prefill=2, decode=1, prefill_tp=1, decode_tp=2)
    assert _tp_by_worker(split) == {"prefill-1": "1", "prefill-2": "1", "decode-1": "2"}
    assert split.worker_threads(cores=16) == 4  # 2 x 1 + 1 x 2 ranks
    mixed = UpConfig(prefill=1, decode=1, tensor_parallel_size=4, decode_tp=2)
    assert _tp_by_worker(mixed) == {"prefill-1": "4", "decode-1": "2"}
    ep = worker_specs(WorkerRun(UpConfig(decode_tp=2, expert_parallel=True), "127.0.0.1:1", "r1"), Path("/m"))
    assert ["--expert-parallel" in s.argv for s in ep] == [False, True]  # only where there are ranks


def test_restarted_children_keep_their_addresses() -> None:
    """Redis and the gateway are restarted on the ports they got first (port 0: any free one), and
    the kvstore on the one its spec names, so every configured address still reaches them."""
    redis = redis_spec("pw")
    assert redis.argv[-2:] == ("--port", "0") and redis.restart
    assert redis_spec("pw", 6390).argv[-2:] == ("--port", "6390")
    config = UpConfig(http_port=0, grpc_port=0)
    argv = gateway_spec(config, Path("/m"), "127.0.0.1:1", ports=(8123, 50123)).argv
    flag = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert (flag["--http-port"], flag["--grpc-port"]) == ("8123", "50123")
    kvstore = kvstore_spec("redis://x:1/0")
    assert kvstore.argv[kvstore.argv.index("--listen") + 1] == kvstore.address != "127.0.0.1:0"


def test_redis_child_serves_its_port_and_exits_when_redis_server_dies(tmp_path: Path) -> None:
    """What the launcher restarts: `redis_child --port N` serves redis://127.0.0.1:N/0 with the
    password, and exits 1 (instead of lingering) once its redis-server is killed."""
    from scalellm.launcher.redis_child import PASSWORD_ENV
    from scalellm.redis_server import free_port, ping

    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "scalellm.launcher.redis_child", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, PASSWORD_ENV: "secret-pw"},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().split()
        assert ready[:2] == ["READY", f"redis://127.0.0.1:{port}/0"], ready
        assert ping("127.0.0.1", port, password="secret-pw") and not ping("127.0.0.1", port)
        os.kill(int(ready[2].removeprefix("redis_pid=")), signal.SIGKILL)
        assert child.wait(30) == 1
        assert "redis-server exited" in child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_a_negative_restart_budget_is_refused() -> None:
    from scalellm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["up", "--max-restarts", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--colocated", "--prefill", "1"],
        ["--decode", "0"],
        ["--prefill", "0"],
        ["--http-port", "70000"],
        ["--colocated", "--tensor-parallel-size", "0"],
        ["--decode-tp", "0"],
        ["--colocated", "--prefill-tp", "2"],  # no prefill workers to size
    ],
)
def test_bad_flags_are_refused_before_anything_starts(argv: list[str]) -> None:
    from scalellm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["up", *argv])
    assert exc.value.code == 2


# ---------------------------------------------------------------- the whole mesh (slow)


class Up:
    """`python -m scalellm up ...` in its own session, its output collected line by line.

    Holds tests.procs.whole_machine() from its start to cleanup(): one mesh at a time."""

    def __init__(self, *args: str, env: dict[str, str | None] | None = None) -> None:
        """env: added to this process's environment; a None value removes the variable."""
        self._machine = contextlib.ExitStack()
        self._machine.enter_context(whole_machine())
        self.lines: list[str] = []
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scalellm", "up", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={k: v for k, v in environ.items() if v is not None},
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-150:])

    def wait_for(self, prefix: str, timeout: float = 100.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"scalellm up exited {self.proc.returncode}:\n{self.log()}"
            time.sleep(0.1)
        raise AssertionError(f"no {prefix!r} line in {timeout} s:\n{self.log()}")

    def pids(self) -> dict[int, str]:
        """Every process it started (children from its own lines, redis-server from the READY
        line, anything else from /proc), with the start time that tells a reused pid apart."""
        pids = {int(m) for line in self.lines for m in re.findall(r"\b(?:redis_)?pid=(\d+)", line)}
        pids |= _descendants(self.proc.pid)
        return {pid: _start_time(pid) for pid in pids}

    def addresses(self) -> list[tuple[str, int]]:
        found = re.findall(r"(?:^|[\s=/])(127\.0\.0\.1):(\d+)", "\n".join(self.lines))
        return [(host, int(port)) for host, port in set(found)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def cleanup(self, known: dict[int, str]) -> None:
        """After a failure: make sure nothing outlives the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in _alive(known):
            os.kill(pid, signal.SIGKILL)
        self._machine.close()  # the next mesh may start


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else ""


def _alive(pids: dict[int, str]) -> list[int]:
    """Pids still running as the same process (not a zombie, not a reused pid)."""
    return [pid for pid, start in pids.items() if (f := _stat(pid)) and f[0] != "Z" and f[19] == start]


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(scalellm_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _assert_nothing_beyond_loopback(up: Up, pids: dict[int, str], at_least: int = 12) -> None:
    """Every socket any process of the mesh listens on is on loopback."""
    exposed = {}
    for pid in _alive(pids):
        sockets = listening(pid)
        exposed[pid] = sockets
        assert all(is_loopback(addr) for addr, _ in sockets), f"pid {pid} listens on {sockets}\n{up.log()}"
    assert sum(len(s) for s in exposed.values()) >= at_least, exposed  # grpc, metrics, transfer, gloo, ...


def _child_pid(up: Up, name: str) -> int:
    return int(re.search(rf"started {name} pid=(\d+)", up.log()).group(1))  # type: ignore[union-attr]


def _mesh_token_of(pid: int) -> str:
    """The SCALELLM_MESH_TOKEN in a process's environment ('' if none)."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"SCALELLM_MESH_TOKEN="):
            return entry.split(b"=", 1)[1].decode()
    return ""


def _assert_secret_only_in_environment(pids: dict[int, str], token: str, services: int = 6) -> None:
    """`ps` shows no secret: the token is in the children's environment, never on a command line."""
    for pid in _alive(pids):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert token not in cmdline and "requirepass" not in cmdline and "redis://:" not in cmdline, cmdline
    found = [pid for pid in _alive(pids) if b"services." in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(found) == services and all(_mesh_token_of(pid) == token for pid in found), found


def _assert_no_call_was_refused(up: Up) -> None:
    """The kvstore refused no registry call for a missing or wrong token: every child that talks
    to it (workers, gateway, planner) carries the token."""
    url = re.search(r"ready kvstore .* metrics=(\S+)", up.log()).group(1)  # type: ignore[union-attr]
    refused = {k: v for k, v in _metrics(url).items() if k.startswith("scalellm_mesh_auth_failures")}
    assert not any(refused.values()), refused


async def _refused_without_token(address: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        request = worker_pb2.GenerateRequest(request_id="intruder", prompt_token_ids=[1, 2, 3])
        call = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(request, timeout=10)
        return await call.code()


def _prompt(i: int) -> str:
    return f"Fact {i}: the capital of France is"


def engine_texts(model: Path, count: int) -> list[str]:
    """What the engine alone answers to the first count prompts (greedy, 8 tokens, float32 like the mesh)."""
    from scalellm import LLM, SamplingParams

    llm = LLM(model=str(model), num_kv_blocks=256, dtype="float32")
    outs = llm.generate([_prompt(i) for i in range(count)], SamplingParams(temperature=0.0, max_tokens=8))
    return [o.outputs[0].text for o in outs]


def _assert_gone(up: Up, pids: dict[int, str], addresses: list[tuple[str, int]]) -> None:
    deadline = time.monotonic() + 60  # the sweep of process groups is synchronous: a hang guard only
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids), f"left running: {_alive(pids)}\n{up.log()}"
    assert addresses and all(_free(h, p) for h, p in addresses), [a for a in addresses if not _free(*a)]


@pytest.mark.slow
def test_up_serves_over_every_worker_and_stops_clean(demo_model_dir: Path) -> None:
    import openai

    token = "e2e-mesh-token-0123456789abcdef"
    expected = engine_texts(demo_model_dir, 32)
    up = Up("--prefill", "2", "--decode", "2", "--http-port", "0", "--grpc-port", "0",
            "--num-kv-blocks", "256", "--startup-timeout", "90", "--drain-timeout", "10",
            "--dtype", "float32", "--gateway-arg=--routing=load",  # short prompts to the prefill tier too
            env={"SCALELLM_MESH_TOKEN": token})  # fmt: skip
    pids: dict[int, str] = {}
    try:
        ready = up.wait_for("mesh ready: ")
        pids = up.pids()
        base_url = ready.split()[2]
        children = {
            m[0]: int(m[1]) for line in up.lines for m in re.findall(r"started (\S+) pid=(\d+)", line)
        }
        assert set(children) == CHILDREN
        assert all(_stat(pid)[3] == str(pid) for pid in children.values()), "each child leads its own session"
        metrics = dict(re.findall(r"ready ((?:prefill|decode)-\d) .* metrics=(\S+)", "\n".join(up.lines)))

        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)

        def complete(i: int) -> openai.types.Completion:
            return client.completions.create(model=MODEL, prompt=_prompt(i), max_tokens=8, temperature=0)

        with ThreadPoolExecutor(32) as pool:
            outs = list(pool.map(complete, range(32)))
        assert [o.choices[0].text for o in outs] == expected  # greedy: the engine alone's text
        assert all(o.usage.completion_tokens == 8 for o in outs)

        served = {name: _metrics(url) for name, url in metrics.items()}
        finished = {
            n: sum(v for k, v in m.items() if k.startswith("scalellm_requests_total"))
            for n, m in served.items()
        }
        assert finished["decode-1"] > 0 and finished["decode-2"] > 0, finished
        assert finished["decode-1"] + finished["decode-2"] == 32, finished
        prefilled = {n: served[n].get('scalellm_requests_total{outcome="prefilled"}', 0) for n in served}
        assert prefilled["prefill-1"] > 0 and prefilled["prefill-2"] > 0, prefilled
        assert all(
            served[n].get('scalellm_kv_transfer_bytes_total{direction="in"}', 0) > 0
            for n in ("decode-1", "decode-2")
        )

        _assert_nothing_beyond_loopback(up, pids)  # with every KV channel open
        _assert_secret_only_in_environment(pids, token)
        _assert_no_call_was_refused(up)
        decode = re.search(r"ready decode-1 (\S+)", up.log()).group(1)  # type: ignore[union-attr]
        assert asyncio.run(_refused_without_token(decode)) is grpc.StatusCode.UNAUTHENTICATED

        addresses = up.addresses()
        assert up.stop() == 0, up.log()
        _assert_gone(up, pids, addresses)
        log = up.lines
        first = {key: next(i for i, line in enumerate(log) if key in line) for key in (
            "gateway shutting down", "draining", "kvstore shutting down", "stopped 7 processes")}  # fmt: skip
        assert list(first.values()) == sorted(first.values()), first  # gateway, workers, kvstore, done
    finally:
        up.cleanup(pids)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_mesh_keeps_serving(demo_model_dir: Path) -> None:
    up = Up("--colocated", "--decode", "1", "--http-port", "0", "--grpc-port", "0", "--num-kv-blocks", "64",
            "--quiet", "--startup-timeout", "90", "--drain-timeout", "5")  # fmt: skip
    pids: dict[int, str] = {}
    try:
        ready = up.wait_for("mesh ready: ")
        decode = int(re.search(r"started decode-1 pid=(\d+)", "\n".join(up.lines)).group(1))  # type: ignore[union-attr]
        os.kill(decode, signal.SIGKILL)
        up.wait_for(f"scalellm up: decode-1 (pid {decode}) exited unexpectedly with status -9; restarting it")
        assert up.proc.poll() is None  # the launcher keeps the mesh up
        import openai

        client = openai.OpenAI(base_url=ready.split()[2], api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 120  # a hang guard only
        while True:  # the restarted worker registers again and the gateway routes to it
            try:
                reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        pids = up.pids()
        addresses = up.addresses()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0, up.log()
        _assert_gone(up, pids, addresses)
    finally:
        up.cleanup(pids)


@pytest.mark.slow
def test_a_dead_gateway_is_restarted_on_its_ports_and_a_crash_loop_stops_the_mesh(
    demo_model_dir: Path,
) -> None:
    import openai

    up = Up("--colocated", "--decode", "1", "--http-port", "0", "--grpc-port", "0", "--num-kv-blocks", "64",
            "--quiet", "--startup-timeout", "90", "--drain-timeout", "5", "--max-restarts", "1")  # fmt: skip
    pids: dict[int, str] = {}
    try:
        ready = up.wait_for("mesh ready: ")
        first = up.wait_for("scalellm up: ready gateway ")
        gateway = _child_pid(up, "gateway")
        os.kill(gateway, signal.SIGKILL)
        up.wait_for(f"scalellm up: gateway (pid {gateway}) exited unexpectedly with status -9; restarting it")
        again = _wait_for_nth(up, "scalellm up: ready gateway ", 2)
        assert again.split()[4:6] == first.split()[4:6], (first, again)  # the same HTTP and gRPC ports
        client = openai.OpenAI(base_url=ready.split()[2], api_key="none", max_retries=0, timeout=30)
        reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 4  # served at once

        pids = up.pids()
        addresses = up.addresses()
        restarted = int(again.split("pid=")[1].split()[0])
        os.kill(restarted, signal.SIGKILL)  # dies again within a minute of its start: over budget
        assert up.proc.wait(60) == 1, up.log()
        error = next(line for line in up.lines if line.startswith("scalellm up: error: "))
        assert error == (
            f"scalellm up: error: gateway (pid {restarted}) exited unexpectedly with status -9; it died "
            "2 times in a row, each time within 60 s of its start (--max-restarts 1): giving up; "
            "its last output:"
        ), error
        assert (
            f"    READY {again.split()[4]} {again.split()[5]}" in up.lines
        )  # its last lines, though --quiet
        _assert_gone(up, pids, addresses)
    finally:
        up.cleanup(pids)


def _wait_for_nth(up: Up, prefix: str, n: int, timeout: float = 100.0) -> str:
    """The n-th line that starts with prefix, once printed."""
    deadline = time.monotonic() + timeout
    while len(found := [line for line in up.lines if line.startswith(prefix)]) < n:
        assert up.proc.poll() is None, f"scalellm up exited {up.proc.returncode}:\n{up.log()}"
        assert time.monotonic() < deadline, f"no {n} {prefix!r} lines in {timeout} s:\n{up.log()}"
        time.sleep(0.1)
    return found[n - 1]


@pytest.mark.slow
def test_up_runs_a_tp1_prefill_tier_feeding_a_tp2_decode_tier(tiny_chat_model: Path) -> None:
    """`--prefill-tp 1 --decode-tp 2`: the decode worker starts its second rank and takes the
    prefill worker's KV (all heads, scattered to its ranks): the engine alone's greedy text."""
    import openai

    from scalellm import LLM, SamplingParams

    prompts = [_prompt(i) for i in range(3)]
    with LLM(model=str(tiny_chat_model), num_kv_blocks=64, dtype="float32") as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        expected = [o.outputs[0].text for o in outs]
    up = Up(
        "--model",
        str(tiny_chat_model),
        "--prefill",
        "1",
        "--decode",
        "1",
        "--prefill-tp",
        "1",
        "--decode-tp",
        "2",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--num-kv-blocks",
        "64",
        "--dtype",
        "float32",
        "--startup-timeout",
        "120",
        "--drain-timeout",
        "10",
        "--quiet",
        "--gateway-arg=--routing=load",
    )  # fmt: skip  (short prompts go to the prefill tier too)
    pids: dict[int, str] = {}
    try:
        base_url = up.wait_for("mesh ready: ", timeout=150).split()[2]
        pids = up.pids()
        ranks = [p for p in pids if b"scalellm.engine.tp_ranks" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(ranks) == 1 and _stat(ranks[0])[2] == str(_child_pid(up, "decode-1")), up.log()
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        model = tiny_chat_model.name
        texts = [
            client.completions.create(
                model=model, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
            for p in prompts
        ]
        assert texts == expected
        url = re.search(r"ready decode-1 .* metrics=(\S+)", up.log()).group(1)  # type: ignore[union-attr]
        assert _metrics(url).get('scalellm_kv_transfer_bytes_total{direction="in"}', 0) > 0
        addresses = up.addresses()
        assert up.stop() == 0, up.log()
        _assert_gone(up, pids, addresses)
    finally:
        up.cleanup(pids)
