"""Stop strings over a stream of text deltas.

The matcher emits text as soon as it cannot be the start of a stop string, holds back a tail that
still could be, and on a match cuts the text exactly before the stop string (OpenAI and vLLM leave the
stop string out of the output; ``include_stop=True`` keeps it). The stream ends where a stop string
first completes, as it would fed one character at a time, so the result never depends on how the text
was split into deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Feed text deltas with :meth:`add`; call :meth:`flush` when the stream ends without a match."""

    __slots__ = ("_held", "_max_len", "_stops", "include_stop", "matched")

    def __init__(self, stop: Iterable[str] | str | None = None, include_stop: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        # Empty strings would match everywhere: ignore them. Keep order, drop duplicates.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in (stop or ()) if s))
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.include_stop = include_stop
        self.matched: str | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held(self) -> str:
        """Text withheld because it may be the start of a stop string."""
        return self._held

    def add(self, delta: str) -> tuple[str, str | None]:
        """Return ``(text safe to emit now, the stop string matched or None)``.

        After a match the stream is over: further calls return ``("", None)``.
        """
        if self.matched is not None:
            return "", None
        if not self._stops:
            return delta, None
        if not delta:
            return "", None
        # Every match that ends in this delta starts inside held + delta (held is shorter than any stop).
        buf = self._held + delta
        # The stream ends where a stop string first completes (the same whatever the delta split);
        # if two complete at the same place, the one starting earlier (the longer) wins.
        best_at, best_end, best = -1, -1, None
        for s in self._stops:
            at = buf.find(s)
            if at == -1:
                continue
            end = at + len(s)
            if best is None or end < best_end or (end == best_end and at < best_at):
                best_at, best_end, best = at, end, s
        if best is not None:
            self._held = ""
            self.matched = best
            end = best_at + len(best) if self.include_stop else best_at
            return buf[:end], best

        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        return max((partial_suffix(buf, s) for s in self._stops), default=0)

    def flush(self) -> str:
        """End of stream: release the held tail (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``: what a stream
    keeps back until the next piece shows whether the tag (a stop string, a tool call's or a
    reasoning block's tag) is there."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
