"""Exponential backoff with jitter for reconnects and retries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays initial_s, initial_s*multiplier, ... capped at max_s, each jittered by +-jitter."""

    initial_s: float = 0.1
    max_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    _attempt: int = field(default=0, init=False, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows it until max_s."""
        base = min(self.max_s, self.initial_s * self.multiplier**self._attempt)
        self._attempt = min(self._attempt + 1, 64)  # the cap keeps multiplier**attempt finite
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        """Start again from initial_s (call after a success)."""
        self._attempt = 0
