"""Per-transfer statistics and per-manager counters (exported to Prometheus by the services)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TransferStats:
    """One completed transfer, as measured by the side reporting it."""

    transfer_id: int
    num_tokens: int
    num_blocks: int
    bytes: int
    """KV payload bytes put on (or taken off) the wire."""
    seconds: float
    """From the first byte announced to the last byte landed (sender: handed to the transport)."""

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CounterSnapshot:
    transfers: int
    failures: int
    cancelled: int
    bytes: int
    seconds: float
    refused: int = 0
    """Control messages or joins refused for a missing or wrong tag (a peer without the token)."""


@dataclass
class TransferCounters:
    """Monotonic totals of one manager; thread-safe."""

    transfers: int = 0
    failures: int = 0
    cancelled: int = 0
    bytes: int = 0
    seconds: float = 0.0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, stats: TransferStats, cancelled: bool = False) -> None:
        with self._lock:
            self.transfers += 1
            self.cancelled += int(cancelled)
            self.bytes += stats.bytes
            self.seconds += stats.seconds

    def record_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def record_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def snapshot(self) -> CounterSnapshot:
        with self._lock:
            return CounterSnapshot(
                self.transfers, self.failures, self.cancelled, self.bytes, self.seconds, self.refused
            )
