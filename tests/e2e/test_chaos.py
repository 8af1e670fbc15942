"""Chaos under load: `scalellm up --prefill 1 --decode 2` on a tiny random model serves a steady
stream of greedy requests while each kind of child is taken down in turn, and every outcome is
counted:

    phase      what happens                          failed requests allowed
    prefill    SIGKILL prefill-1                     0 (the decode worker recomputes the prompt)
    kvstore    SIGKILL the kvstore                   0 (routing runs on the gateway's view)
    redis      SIGKILL redis-server (empty restart)  0 (workers register again)
    decode     SIGTERM decode-2 (a rolling restart)  0 (it drains; the gateway routes around it)
    gateway    SIGKILL the gateway                   at most one per client: the request it had
                                                     in flight or sent while the gateway was down

The launcher restarts each one at the same address. Every request that succeeds must return the
text the engine alone returns for its prompt.

A SIGKILLed decode worker is the second test: 32 streams in flight (half greedy, half seeded) all
finish, those on the killed worker migrated to the other one (the gateway resumes each from the
tokens it already streamed), and every text equals the engine alone's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scalellm.launcher.probes import http_health
from tests.e2e import test_autoscale
from tests.e2e.test_autoscale import _wait
from tests.e2e.test_up import Up, _assert_gone, _metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("whole_machine")]

tiny_served = test_autoscale.tiny_served  # the tiny random Llama with the demo model's tokenizer

CLIENTS = 4
MAX_TOKENS = 24
PROMPTS = [[(p * 37 + k * 11) % 400 + 20 for k in range(12 + p)] for p in range(8)]


@pytest.fixture(scope="module")
def expected(tiny_served: Path) -> list[str]:
    """Each prompt's greedy text from the engine alone."""
    from scalellm import LLM, SamplingParams

    llm = LLM(model=str(tiny_served), num_kv_blocks=64)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    )
    return [o.outputs[0].text for o in outs]


@dataclass
class Outcomes:
    ok: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class GreedyLoad:
    """Closed-loop clients, one OpenAI client (one connection) each, cycling through PROMPTS.

    Each request is counted in the phase that was current when it started. In a phase begun with
    `hold=True`, a client whose request fails waits until `resume()` before its next one, so a
    gateway that is down costs each client one request, not a spin of refused connections.
    """

    def __init__(self, base_url: str, expected: list[str]) -> None:
        self.base_url = base_url
        self.expected = expected
        self.phase = "start"
        self.outcomes: dict[str, Outcomes] = {}
        self._entered: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._resumed = threading.Event()
        self._resumed.set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _run(self, client_no: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=60)
        i = client_no
        while not self._stop.is_set():
            with self._lock:
                phase = self.phase
                self._entered.setdefault(phase, set()).add(client_no)
                self._changed.notify_all()
            which = i % len(PROMPTS)
            try:
                out = client.completions.create(
                    model="", prompt=PROMPTS[which], max_tokens=MAX_TOKENS, temperature=0
                )
                text, error = out.choices[0].text, None
            except Exception as exc:  # every failure counts (openai.APIConnectionError expected only)
                text, error = None, exc
            with self._lock:
                outcome = self.outcomes.setdefault(phase, Outcomes())
                if error is not None:
                    outcome.failed.append(f"{type(error).__name__}: {error}")
                elif text == self.expected[which]:
                    outcome.ok += 1
                else:
                    outcome.wrong.append(f"prompt {which}: {text!r} != {self.expected[which]!r}")
                self._changed.notify_all()
            if error is not None:
                self._resumed.wait()  # set unless a holding phase is waiting for resume()
            i += 1

    def begin(self, phase: str, hold: bool = False) -> None:
        """Start a phase and return once every client has started a request in it, so anything
        in flight from now on is counted in it."""
        if hold:
            self._resumed.clear()
        with self._lock:
            self.phase = phase
            self._wait(lambda: len(self._entered.get(phase, ())) == CLIENTS, f"every client in {phase}")

    def resume(self) -> None:
        """Let clients that failed send again."""
        self._resumed.set()

    def wait_served(self, phase: str, more: int, may_fail: int = 0) -> None:
        """Wait until `more` further requests of the phase succeeded; fail at once when more than
        `may_fail` of its requests failed or one returned the wrong text."""
        with self._lock:
            outcome = self.outcomes.setdefault(phase, Outcomes())
            start = outcome.ok

            def settled() -> bool:
                return outcome.ok >= start + more or len(outcome.failed) > may_fail or bool(outcome.wrong)

            self._wait(settled, f"{more} more served in {phase}")
            assert len(outcome.failed) <= may_fail and not outcome.wrong, (phase, outcome)

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Under the lock: wait for condition (the timeout is a hang guard)."""
        if not self._changed.wait_for(condition, timeout):
            raise AssertionError(f"no {what} within {timeout} s: {self.outcomes}")

    def stop(self) -> None:
        self._stop.set()
        self._resumed.set()
        for thread in self._threads:
            thread.join(90)


def _line(up: Up, pattern: str, after: int = 0, timeout: float = 120.0) -> tuple[int, re.Match[str]]:
    """The first launcher line at index >= after that matches pattern, once it is printed."""
    deadline = time.monotonic() + timeout
    seen = after
    while True:
        lines = up.lines[:]
        for index in range(seen, len(lines)):
            if (found := re.search(pattern, lines[index])) is not None:
                return index, found
        seen = len(lines)
        assert up.proc.poll() is None, f"scalellm up exited {up.proc.returncode}:\n{up.log()}"
        assert time.monotonic() < deadline, f"no line matching {pattern!r} within {timeout} s:\n{up.log()}"
        time.sleep(0.1)


def _latest(up: Up, pattern: str) -> re.Match[str]:
    found = [m for line in up.lines if (m := re.search(pattern, line)) is not None]
    assert found, f"no line matching {pattern!r}:\n{up.log()}"
    return found[-1]


def _kill_and_wait_restart(up: Up, name: str, pid: int, sig: int, status: str) -> str:
    """Signal a child; return its ready line once the launcher restarted it."""
    mark = len(up.lines)
    os.kill(pid, sig)
    index, _ = _line(
        up, rf"^scalellm up: {re.escape(name)} \(pid \d+\) \S.* status {status}; restarting it", mark
    )
    _, ready = _line(up, rf"^scalellm up: ready {re.escape(name)} .*", index)
    return ready.group(0)


def test_no_request_is_lost_when_each_kind_of_child_goes_down(tiny_served: Path, expected: list[str]) -> None:
    up = Up(
        "--model", str(tiny_served), "--prefill", "1", "--decode", "2", "--http-port", "0", "--grpc-port", "0",
        "--quiet", "--num-kv-blocks", "128", "--max-num-seqs", "8", "--startup-timeout", "120",
        "--drain-timeout", "30",
    )  # fmt: skip
    pids: dict[int, str] = {}
    load: GreedyLoad | None = None
    try:
        ready = up.wait_for("mesh ready: ", timeout=150)
        base_url = ready.split()[2]
        first_lines = {name: _latest(up, rf"ready {name} (\S+)").group(1) for name in ("redis", "kvstore")}
        first_gateway = _latest(up, r"ready gateway (\S+ grpc=\S+)").group(1).split()
        kvstore_metrics = _latest(up, r"ready kvstore .* metrics=(\S+)").group(1)
        pids = up.pids()
        load = GreedyLoad(base_url, expected)
        load.wait_served("start", CLIENTS)

        load.begin("prefill")
        prefill = int(_latest(up, r"started prefill-1 pid=(\d+)").group(1))
        _kill_and_wait_restart(up, "prefill-1", prefill, signal.SIGKILL, "-9")
        load.wait_served("prefill", CLIENTS)

        load.begin("kvstore")
        kvstore = int(_latest(up, r"started kvstore pid=(\d+)").group(1))
        back = _kill_and_wait_restart(up, "kvstore", kvstore, signal.SIGKILL, "-9")
        assert back.split()[4] == first_lines["kvstore"], back  # the address workers were given
        load.wait_served("kvstore", CLIENTS)

        load.begin("redis")
        redis_server = int(_latest(up, r"ready redis \S+ redis_pid=(\d+)").group(1))
        back = _kill_and_wait_restart(up, "redis", redis_server, signal.SIGKILL, "1")
        assert back.split()[4] == first_lines["redis"], back  # the URL the kvstore was given

        def registered() -> float:
            return _metrics(kvstore_metrics).get("scalellm_kvstore_workers", 0.0)

        _wait(lambda: registered() == 3, up, "every worker registered again in the empty Redis")
        load.wait_served("redis", CLIENTS)

        load.begin("decode")
        decode = int(_latest(up, r"started decode-2 pid=(\d+)").group(1))
        decode_metrics = _latest(up, r"ready decode-2 .* metrics=(\S+)").group(1)
        _wait(lambda: _metrics(decode_metrics).get("scalellm_running_batch", 0) > 0, up, "decode-2 busy")
        mark = len(up.lines)
        os.kill(decode, signal.SIGTERM)  # drains: its requests finish, new ones go elsewhere
        _line(up, rf"^scalellm up: decode-2 \(pid {decode}\) stopped \(status 0\); restarting it", mark)
        load.wait_served("decode", CLIENTS)

        load.begin("gateway", hold=True)
        gateway = int(_latest(up, r"started gateway pid=(\d+)").group(1))
        back = _kill_and_wait_restart(up, "gateway", gateway, signal.SIGKILL, "-9")
        assert back.split()[4:6] == first_gateway, back  # the HTTP and gRPC ports clients use
        load.resume()
        load.wait_served("gateway", CLIENTS, may_fail=CLIENTS)
        load.stop()

        outcomes = load.outcomes
        assert all(not o.wrong for o in outcomes.values()), {p: o.wrong[:3] for p, o in outcomes.items()}
        lost = {p: o.failed for p, o in outcomes.items() if p != "gateway" and o.failed}
        assert not lost, lost
        broken = outcomes["gateway"].failed
        assert len(broken) <= CLIENTS and all(f.startswith("APIConnectionError") for f in broken), broken

        # Everything is back: both restarted workers serve again, and the mesh stops clean.
        _line(up, r"^scalellm up: ready decode-2 ", mark)
        _wait(lambda: (http_health(base_url.removesuffix("/v1") + "/health") or {}).get("decode_workers") == 2,
              up, "both decode workers routable")  # fmt: skip
        pids |= up.pids()
        addresses = up.addresses()
        assert up.stop() == 0, up.log()
        _assert_gone(up, pids, addresses)
    finally:
        if load is not None:
            load.stop()
        up.cleanup(pids)


STREAMS = 32
LONG = 800  # tokens per stream (the tiny model's context is 1024): still running when a worker dies


def test_streams_of_a_killed_decode_worker_migrate_and_finish_exactly(tiny_served: Path) -> None:
    from scalellm import LLM, SamplingParams

    prompts = [[(p * 29 + k * 7) % 400 + 20 for k in range(8 + p % 5)] for p in range(STREAMS)]
    seeds = [None if p % 2 == 0 else 1000 + p for p in range(STREAMS)]
    params = [
        SamplingParams(temperature=0.0 if s is None else 0.8, seed=s, max_tokens=LONG, ignore_eos=True)
        for s in seeds
    ]
    llm = LLM(model=str(tiny_served), num_kv_blocks=2048, dtype="float32")  # the exactness anchor's dtype
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    expected = [o.outputs[0].text for o in outs]
    del llm

    up = Up(
        "--model", str(tiny_served), "--prefill", "1", "--decode", "2", "--http-port", "0", "--grpc-port", "0",
        "--quiet", "--num-kv-blocks", "2048", "--dtype", "float32", "--max-num-seqs", "32", "--startup-timeout", "120",
    )  # fmt: skip
    pids: dict[int, str] = {}
    poller: subprocess.Popen[str] | None = None
    try:
        base_url = up.wait_for("mesh ready: ", timeout=150).split()[2]
        pids = up.pids()
        pids_of = {n: int(_latest(up, rf"started {n} pid=(\d+)").group(1)) for n in ("decode-1", "decode-2")}
        metrics_of = {n: _latest(up, rf"ready {n} .* metrics=(\S+)").group(1) for n in pids_of}

        def stream(i: int) -> str:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
            chunks = client.completions.create(
                model="", prompt=prompts[i], max_tokens=LONG, stream=True, seed=seeds[i],
                temperature=0.0 if seeds[i] is None else 0.8, extra_body={"ignore_eos": True},
            )  # fmt: skip
            return "".join(chunk.choices[0].text if chunk.choices else "" for chunk in chunks)

        # The first worker to run an eighth of the streams, ~64 tokens into each, dies early in
        # their 800 tokens. A later kill can find a worker that already sent its last token into
        # the gateway's buffers (the gateway trails the worker on two cores); an earlier one,
        # streams whose first token the gateway has not yet had (those are dispatched again, not
        # migrated): either way nothing migrates. It is stopped (SIGSTOP) the moment its metrics
        # say so, by a poller in a process of its own (tests/e2e/busy_worker.py) that the streams'
        # threads cannot hold up while the workers run through their tokens.
        watch = {"metrics": metrics_of, "pids": pids_of, "at_least": STREAMS // 8,
                 "min_tokens": 64 * (STREAMS // 8), "timeout": 120}  # fmt: skip
        poller = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("busy_worker.py")), json.dumps(watch)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert poller.stdout is not None and poller.stdout.readline().strip() == "ready"
        with ThreadPoolExecutor(STREAMS) as pool:
            futures = [pool.submit(stream, i) for i in range(STREAMS)]
            found = json.loads(poller.communicate(timeout=150)[0])
            if "error" in found:  # say what the streams and the mesh were doing
                done = [f for f in futures if f.done()]
                errors = [repr(f.exception()) for f in done if f.exception() is not None]
                raise AssertionError(
                    f"{found['error']}\n{len(done)} streams done, {len(errors)} failed {errors[:3]}\n{up.log()[-6000:]}"
                )
            victim, running = found["victim"], found["running"]
            os.kill(pids_of[victim], signal.SIGKILL)
            texts = [f.result(timeout=300) for f in futures]
        assert running > 0  # the killed worker had streams in flight
        assert texts == expected
        gateway_metrics = _metrics(base_url.removesuffix("/v1") + "/metrics")
        migrated = sum(
            v for k, v in gateway_metrics.items() if k.startswith("scalellm_gateway_migrations_total")
        )
        moved = {k: v for k, v in gateway_metrics.items() if "migrat" in k or "retr" in k}
        assert migrated > 0, (victim, running, moved, up.log()[-4000:])
        pids |= up.pids()
        addresses = up.addresses()
        assert up.stop() == 0, up.log()
        _assert_gone(up, pids, addresses)
    finally:
        if poller is not None and poller.poll() is None:
            poller.kill()
            poller.wait()
        up.cleanup(pids)
