"""The measured part of a worker's load report: token rate, TTFT, ITL and prefill backlog."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scalellm.engine.scheduler import prefill_backlog_tokens
from scalellm.worker.load_window import LoadWindow


@dataclass(eq=False)
class _Req:
    arrival_time: float
    first_token_time: float | None = None
    num_computed_tokens: int = 0
    prompt: int = 0
    output: int = 0
    request_id: str = ""

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.output

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt


@dataclass
class _Event:
    """The fields of TokenEvent the window reads."""

    request: _Req
    token_id: int | None = 7
    finished: bool = False
    logprobs: object = field(default=None)

    @property
    def request_id(self) -> str:
        return self.request.request_id or str(id(self.request))

    @property
    def ttft_s(self) -> float | None:
        first = self.request.first_token_time
        return None if first is None else first - self.request.arrival_time


def test_ttft_itl_and_rate_over_the_window() -> None:
    window = LoadWindow(window_s=10.0)
    a = _Req(arrival_time=0.0, first_token_time=0.5, request_id="a")
    b = _Req(arrival_time=1.0, first_token_time=2.0, request_id="b")
    window.on_step(0.5, [_Event(a)])  # a's first token: TTFT 0.5
    window.on_step(0.7, [_Event(a)])  # ITL 0.2
    window.on_step(2.0, [_Event(a), _Event(b)])  # a: ITL 1.3; b: TTFT 1.0
    s = window.signals(now=2.0)
    assert s.ttft_s == pytest.approx((0.5 + 1.0) / 2)
    assert s.itl_s == pytest.approx((0.2 + 1.3) / 2)
    assert s.tokens_per_second == pytest.approx(3 / 1.5)  # the oldest step's token is before the span

    window.on_step(2.1, [_Event(a, finished=True), _Event(b, token_id=None, finished=True)])
    a2 = _Req(arrival_time=2.1, first_token_time=2.5, request_id="a")  # the id again, a new request
    window.on_step(13.0, [_Event(a2)])  # everything before 3.0 left the window
    s = window.signals(now=13.0)
    assert s.ttft_s == pytest.approx(0.4) and s.itl_s == 0.0


def test_an_idle_worker_reports_no_measurements() -> None:
    window = LoadWindow(window_s=10.0)
    req = _Req(arrival_time=0.0, first_token_time=1.0)
    window.on_step(1.0, [_Event(req)])
    window.on_step(1.1, [_Event(req)])
    assert window.signals(now=5.0).itl_s == pytest.approx(0.1)
    idle = window.signals(now=11.2)
    assert (idle.tokens_per_second, idle.ttft_s, idle.itl_s) == (0.0, 0.0, 0.0)


def test_a_request_whose_finish_was_never_seen_is_forgotten() -> None:
    window = LoadWindow(window_s=1.0)
    lost = _Req(arrival_time=0.0)
    window.on_step(0.0, [_Event(lost)])
    for t in range(1, 5):
        window.on_step(float(t), [])
    assert not window._last_token  # pruned once it had no token for a whole window


def test_backlog_counts_queued_tokens_and_the_rest_of_prompts_in_prefill() -> None:
    waiting = [_Req(0.0, prompt=40), _Req(0.0, prompt=10, output=3)]  # the second was preempted
    running = [
        _Req(0.0, prompt=40, num_computed_tokens=16),  # chunked prefill: 24 to go
        _Req(0.0, prompt=8, output=2, num_computed_tokens=9),  # decoding: no backlog
    ]
    assert prefill_backlog_tokens(waiting, running) == 40 + 13 + 24


def test_the_engines_backlog_falls_as_chunks_run(tiny_llama: Path) -> None:
    """Chunked prefill of 3 prompts of 40 tokens, 8 tokens a step, one sequence at a time: the
    backlog in the engine's stats (what the heartbeat reports)."""
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine
    from scalellm.types import SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama), num_kv_blocks=64, block_size=4, max_num_seqs=1,
            max_num_batched_tokens=8, num_threads=1,
        )
    )  # fmt: skip
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3, 43)), SamplingParams(max_tokens=2, ignore_eos=True))
    seen = [engine.stats().prefill_backlog_tokens]
    while engine.has_unfinished():
        engine.step()
        seen.append(engine.stats().prefill_backlog_tokens)
    assert seen[:6] == [120, 112, 104, 96, 88, 80]  # r0's prompt, 8 tokens a step
    assert seen[6] == 80  # r0 decodes its second token; r1 waits for the only slot
    assert seen[-1] == 0 and seen == sorted(seen, reverse=True)


async def test_engine_host_reports_what_it_measured(tiny_llama: Path) -> None:
    """The heartbeat's load (EngineHost.load) carries the window's signals and the batch limit."""
    from scalellm.engine.config import EngineConfig
    from scalellm.registry import WorkerRole
    from scalellm.types import SamplingParams
    from scalellm.worker.config import WorkerConfig
    from scalellm.worker.engine_host import EngineHost
    from scalellm.worker.metrics import WorkerMetrics

    config = WorkerConfig(
        role=WorkerRole.BOTH,
        engine=EngineConfig(
            model=str(tiny_llama), num_kv_blocks=64, block_size=4, num_threads=1, max_num_seqs=5
        ),
    )
    host = EngineHost(config, WorkerMetrics())
    assert host.info("127.0.0.1:1").max_running == 5
    assert host.load().ttft_s == 0.0 and host.load().itl_s == 0.0
    host.start()
    try:
        for i in range(2):
            req = host.engine.make_request(
                f"r{i}", [5, 17, 99, 3], SamplingParams(max_tokens=6, ignore_eos=True)
            )
            tokens = [e.token_id async for e in host.aengine.add_and_stream(req)]
            assert len(tokens) == 6
    finally:
        host.stop()
    load = host.load()
    assert load.ttft_s > 0 and load.itl_s > 0 and load.tokens_per_second > 0
    assert load.prefill_backlog_tokens == 0 and load.running == 0 and load.waiting == 0
