"""Server-sent events, as OpenAI-compatible servers stream them: `data: ...` lines, blank-line ends."""

from __future__ import annotations


class SSEParser:
    """Feed raw bytes as they arrive; get back the data payload of every completed event.

    Handles events split across reads, CRLF line ends, comment lines (`: ping`), other fields
    (`event:`, `id:`) and multi-line data (joined with newlines, per the SSE spec).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return events
            line = self._buffer[:end].rstrip(b"\r").decode("utf-8")
            self._buffer = self._buffer[end + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # comments (":...") and other fields are ignored

    def close(self) -> list[str]:
        """The last event when the stream ended without its blank line."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events
