"""LoadWindow: the measured part of a worker's load report, over a sliding window of steps.

The step thread calls `on_step` after every engine step; the event loop reads `signals()` at each
heartbeat. Each step adds one sample and the totals are kept running, so a step costs O(its
events), never O(window):

    step:    (at, tokens, ttft_sum, ttft_count, itl_sum, itl_count)   appended, totals += sample
    expiry:  samples older than window_s popped from the left,       totals -= sample
    publish: WindowSignals(tokens/s, mean TTFT, mean ITL)           one frozen object, assigned whole

TTFT is the engine's (arrival at this worker to its first token, so a decode worker's includes the
remote prefill), counted when a request's token is first seen in a step; ITL is the time between
two steps that each gave the same request a token. Torch-free: it reads only the events' fields
below. The prefill backlog is not measured here: it is the engine's own count (EngineStats).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class _Event(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def token_id(self) -> int | None: ...

    @property
    def finished(self) -> bool: ...

    @property
    def ttft_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class WindowSignals:
    """What the window says as of `at` (time.monotonic); zeros where nothing was measured."""

    tokens_per_second: float = 0.0
    ttft_s: float = 0.0
    itl_s: float = 0.0
    at: float = 0.0


class LoadWindow:
    """Token rate, TTFT and ITL over the last window_s seconds of steps (see the module doc)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, float, int, float, int]] = deque()
        self._totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # tokens, ttft sum, ttft n, itl sum, itl n
        self._last_token: dict[str, float] = {}
        """Request id -> when its last token was seen."""
        self._pruned_at = 0.0
        self._published = WindowSignals()

    def on_step(self, now: float, events: Sequence[_Event]) -> int:
        """Step thread: fold one step in and publish; returns the tokens it produced."""
        tokens = ttft_n = itl_n = 0
        ttft_sum = itl_sum = 0.0
        last = self._last_token
        for event in events:
            request_id = event.request_id
            if event.token_id is not None:
                tokens += 1
                previous = last.get(request_id)
                if previous is not None:
                    itl_sum += now - previous
                    itl_n += 1
                elif (ttft := event.ttft_s) is not None:
                    ttft_sum += ttft
                    ttft_n += 1
                last[request_id] = now
            if event.finished:
                last.pop(request_id, None)
        sample = (now, tokens, ttft_sum, ttft_n, itl_sum, itl_n)
        self._samples.append(sample)
        self._add(sample, 1)
        while now - self._samples[0][0] > self.window_s:
            self._add(self._samples.popleft(), -1)
        self._prune(now)
        self._publish(now)
        return tokens

    def signals(self, now: float | None = None) -> WindowSignals:
        """The last published signals; all zero once the window has passed with no step (an
        idle worker)."""
        signals = self._published
        now = time.monotonic() if now is None else now
        if now - signals.at > self.window_s:
            return WindowSignals(at=signals.at)
        return signals

    def _add(self, sample: tuple[float, int, float, int, float, int], sign: int) -> None:
        for i, value in enumerate(sample[1:]):
            self._totals[i] += sign * value

    def _publish(self, now: float) -> None:
        tokens, ttft_sum, ttft_n, itl_sum, itl_n = self._totals
        span = now - self._samples[0][0]
        # The oldest step's tokens were made before the span starts: leave them out of the rate.
        rate = (tokens - self._samples[0][1]) / span if span > 0 else 0.0
        self._published = WindowSignals(
            tokens_per_second=max(0.0, rate),
            ttft_s=ttft_sum / ttft_n if ttft_n >= 1 else 0.0,
            itl_s=itl_sum / itl_n if itl_n >= 1 else 0.0,
            at=now,
        )

    def _prune(self, now: float) -> None:
        """Once a window: forget requests with no token for a whole window (one whose finish was
        never seen must not stay forever)."""
        if now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        for request_id in [r for r, t in self._last_token.items() if now - t > self.window_s]:
            del self._last_token[request_id]
