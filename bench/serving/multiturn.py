"""A multi-turn workload: conversations that share system prompts and grow turn by turn.

Conversation c uses system prompt c % system_prompts; turn t sends the whole history so far:

    turn 0   [system][user 0]
    turn 1   [system][user 0][answer 0][user 1]
    turn 2   [system][user 0][answer 0][user 1][answer 1][user 2]

Prompts go as token ids (the history's ids are exactly the previous prompt's, so a server's prefix
cache can hit all of it); an answer joins the history re-tokenized from its text (a tokenizer is
needed for that; without one, answers are left out of the history).

Timing, as in chat traffic (and in the multi-turn benchmarks of vLLM's production stack, SGLang and
Dynamo's AIPerf): conversations start staggered, as Poisson arrivals at ``arrival_rate`` per second
(inf: all at once), and a user thinks before each next turn, an exponential pause of mean
``think_time_s`` after the previous answer is complete. Both are drawn from the seed, so every
system under test sees the same schedule:

    conv 0  |start|--turn 0--|..think..|--turn 1--|..think..|--turn 2--| ...
    conv 1       |start|--turn 0--|....think....|--turn 1--| ...
            0 ------------------------------------------------------------------> time

Many conversations are in flight at once (bounded by max_concurrency if set). TTFT is reported
per turn: turn 0 shows the shared system prompt, later turns the conversation's own history.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.serving.client import RunConfig, send
from bench.serving.metrics import RequestResult, Stat
from bench.serving.workload import BenchRequest


@dataclass(frozen=True)
class MultiTurnSpec:
    conversations: int = 16
    turns: int = 6
    system_prompts: int = 2
    system_len: int = 1024
    """Tokens of each shared system prompt."""
    turn_len: int = 64
    """Tokens of each user message."""
    output_len: int = 64
    arrival_rate: float = 1.0
    """Conversations started per second (Poisson); inf starts them all at once."""
    think_time_s: float = 2.0
    """Mean pause (exponential) between an answer and the next turn; 0: none."""

    def __post_init__(self) -> None:
        if self.arrival_rate <= 0 or self.think_time_s < 0:
            raise ValueError("arrival_rate must be > 0 and think_time_s >= 0")


@dataclass(frozen=True)
class Conversation:
    system: tuple[int, ...]
    users: tuple[tuple[int, ...], ...]
    start_s: float = 0.0
    """When the first turn is sent, from the run's start."""
    think_s: tuple[float, ...] = ()
    """The pause before each turn after the first (len(users) - 1 of them)."""


@dataclass
class TurnResult:
    conversation: int
    turn: int
    result: RequestResult


def conversations(
    spec: MultiTurnSpec, vocab: int, seed: int = 0, special_ids: int = 100
) -> list[Conversation]:
    """Seeded random token ids (the system prompts, then each conversation's user messages) and
    the seeded schedule: start times and think times (the module docstring)."""
    rng = random.Random(seed)
    timing = random.Random(seed + 1)  # its own stream: the ids do not depend on the timing knobs

    def ids(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(special_ids, vocab) for _ in range(n))

    def pause(mean: float) -> float:
        return timing.expovariate(1.0 / mean) if 0 < mean < float("inf") else 0.0

    systems = [ids(spec.system_len) for _ in range(max(1, spec.system_prompts))]
    convs, start = [], 0.0
    for c in range(spec.conversations):
        if c:
            start += pause(1.0 / spec.arrival_rate)
        think = tuple(pause(spec.think_time_s) for _ in range(spec.turns - 1))
        users = tuple(ids(spec.turn_len) for _ in range(spec.turns))
        convs.append(Conversation(systems[c % len(systems)], users, start, think))
    return convs


async def run_conversations(
    config: RunConfig, spec: MultiTurnSpec, convs: list[Conversation], tokenizer: Any = None
) -> tuple[list[TurnResult], float]:
    """Run every conversation turn by turn; the results in order of completion and the wall time."""
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    results: list[TurnResult] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(index: int, conv: Conversation) -> None:
            await asyncio.sleep(conv.start_s)
            history = list(conv.system)
            for turn, user in enumerate(conv.users):
                if turn and turn - 1 < len(conv.think_s):
                    await asyncio.sleep(conv.think_s[turn - 1])
                prompt = history + list(user)
                request = BenchRequest(prompt, len(prompt), spec.output_len)
                if limit is None:
                    result = await send(session, config, request)
                else:
                    async with limit:
                        result = await send(session, config, request)
                results.append(TurnResult(index, turn, result))
                if not result.success:
                    return  # the rest of this conversation would not be the same workload
                answer = tokenizer.encode(result.text, add_special_tokens=False).ids if tokenizer else []
                history = prompt + answer

        start = time.perf_counter()
        await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))
        duration = time.perf_counter() - start
    return results, duration


def per_turn(results: list[TurnResult], turns: int) -> list[dict[str, Any]]:
    """TTFT and prefix-cache hits per turn index."""
    rows = []
    for turn in range(turns):
        ok = [r.result for r in results if r.turn == turn and r.result.success]
        prompt = sum(r.prompt_len for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        ttft = Stat.of([r.ttft for r in ok])
        rows.append(
            {
                "turn": turn,
                "completed": len(ok),
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "ttft_median_ms": ttft.median_ms,
                "ttft_p99_ms": ttft.p99_ms,
            }
        )
    return rows


def format_turns(rows: list[dict[str, Any]]) -> str:
    lines = ["turn  completed  prompt tok  cached tok  hit rate  TTFT p50 ms  TTFT p99 ms"]
    for r in rows:
        rate = r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0
        lines.append(
            f"{r['turn']:>4}  {r['completed']:>9}  {r['prompt_tokens']:>10}  {r['cached_tokens']:>10}"
            f"  {rate:>8.1%}  {r['ttft_median_ms']:>11.1f}  {r['ttft_p99_ms']:>11.1f}"
        )
    return "\n".join(lines)
