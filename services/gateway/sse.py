"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]`` last.

JSON is encoded once per chunk, compactly, with non-ASCII text kept as UTF-8.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = "text/event-stream"

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (also for non-streaming bodies)."""
    return _encode(obj).encode("utf-8")


def event(obj: Any) -> bytes:
    """One SSE event carrying obj as JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


def parse_events(raw: bytes) -> list[Any]:
    """Decode a whole SSE body back into its objects ("[DONE]" stays a string); for tests and tools."""
    out: list[Any] = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
