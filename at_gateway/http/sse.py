"""Server-sent events: splitting a byte stream into events, and framing ours.

Upstream events are kept as the exact bytes received, so OpenAI-format
streams pass through without being decoded and re-encoded.
"""

from __future__ import annotations

import json
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


class EventSplitter:
    """Feeds bytes in, gets whole events (each ending in a blank line) out."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        *events, rest = buf.split(b"\n\n")
        self._buf = rest
        return [e + b"\n\n" for e in events if e.strip(b"\n")]

    @property
    def pending(self) -> bytes:
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None when it has none (a comment)."""
    if event.startswith(b"data: ") and event.count(b"\n") <= 2:
        return event[6:].rstrip(b"\n")
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            lines.append(v[1:] if v.startswith(b" ") else v)
    return b"\n".join(lines) if lines else None


def event_name(event: bytes) -> bytes | None:
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


def encode(obj: Any) -> bytes:
    """Frame one JSON object as an SSE data event."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
