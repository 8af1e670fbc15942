"""LoadWindow: the measured part of a worker's load report, over a sliding window of steps.

The step thread calls `on_step` after every engine step; the event loop reads `signals()` at each
heartbeat. Each step adds one sample and the totals are kept running, so a step costs O(its
events), never O(window):

    step:    (at, tokens, ttft_sum, ttft_count, itl_sum, itl_count)   appended, totals += sample
    expiry:  samples older than window_s popped from the left,       totals -= sample
    publish: WindowSignals(tokens/s, mean TTFT, mean ITL, backlog)  one frozen object, assigned whole

TTFT is measured when a request's first token is first seen in a step (arrival at this worker to
its first token, so a decode worker's TTFT includes the remote prefill); ITL is the time between
two steps that each gave the same request a token. Torch-free: it only reads the fields below.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class _Request(Protocol):
    arrival_time: float
    first_token_time: float | None
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_prompt_tokens(self) -> int: ...


class _Event(Protocol):
    @property
    def request(self) -> _Request: ...

    @property
    def token_id(self) -> int | None: ...

    @property
    def finished(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class WindowSignals:
    """What the window says as of `at` (time.monotonic); zeros where nothing was measured."""

    tokens_per_second: float = 0.0
    ttft_s: float = 0.0
    itl_s: float = 0.0
    prefill_backlog_tokens: int = 0
    at: float = 0.0


def prefill_backlog_tokens(waiting: Iterable[_Request], running: Iterable[_Request]) -> int:
    """Tokens still to compute before these requests decode: all of a waiting request's tokens
    not yet computed (a preempted one recomputes its output too), and the rest of the prompt of a
    running request still in prefill."""
    queued = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
    partial = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in running)
    return queued + partial


class LoadWindow:
    """Token rate, TTFT and ITL over the last window_s seconds of steps (see the module doc)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, float, int, float, int]] = deque()
        self._totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # tokens, ttft sum, ttft n, itl sum, itl n
        self._last_token: dict[_Request, float] = {}
        self._pruned_at = 0.0
        self._published = WindowSignals()

    def on_step(self, now: float, events: Sequence[_Event], backlog_tokens: int) -> int:
        """Step thread: fold one step in and publish; returns the tokens it produced."""
        tokens = ttft_n = itl_n = 0
        ttft_sum = itl_sum = 0.0
        last = self._last_token
        for event in events:
            req = event.request
            if event.token_id is not None:
                tokens += 1
                previous = last.get(req)
                if previous is None:
                    ttft_sum += (req.first_token_time or now) - req.arrival_time
                    ttft_n += 1
                else:
                    itl_sum += now - previous
                    itl_n += 1
                last[req] = now
            if event.finished:
                last.pop(req, None)
        sample = (now, tokens, ttft_sum, ttft_n, itl_sum, itl_n)
        self._samples.append(sample)
        self._add(sample, 1)
        while now - self._samples[0][0] > self.window_s:
            self._add(self._samples.popleft(), -1)
        self._prune(now)
        self._publish(now, backlog_tokens)
        return tokens

    def signals(self, now: float | None = None) -> WindowSignals:
        """The last published signals; the measured ones are zero once the window has passed
        with no step (an idle worker). The backlog stays: it was computed after the last step."""
        signals = self._published
        now = time.monotonic() if now is None else now
        if now - signals.at > self.window_s:
            return WindowSignals(prefill_backlog_tokens=signals.prefill_backlog_tokens, at=signals.at)
        return signals

    def _add(self, sample: tuple[float, int, float, int, float, int], sign: int) -> None:
        for i, value in enumerate(sample[1:]):
            self._totals[i] += sign * value

    def _publish(self, now: float, backlog_tokens: int) -> None:
        tokens, ttft_sum, ttft_n, itl_sum, itl_n = self._totals
        span = now - self._samples[0][0]
        # The oldest step's tokens were made before the span starts: leave them out of the rate.
        rate = (tokens - self._samples[0][1]) / span if span > 0 else 0.0
        self._published = WindowSignals(
            tokens_per_second=max(0.0, rate),
            ttft_s=ttft_sum / ttft_n if ttft_n >= 1 else 0.0,
            itl_s=itl_sum / itl_n if itl_n >= 1 else 0.0,
            prefill_backlog_tokens=backlog_tokens,
            at=now,
        )

    def _prune(self, now: float) -> None:
        """Once a window: forget requests with no token for a whole window (one whose finish was
        never seen must not stay forever)."""
        if now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        for req in [r for r, t in self._last_token.items() if now - t > self.window_s]:
            del self._last_token[req]
