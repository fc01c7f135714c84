"""Server-sent events: an incremental decoder for upstream streams and the encoders we send.

Follows the WHATWG event-stream rules that matter for OpenAI streams: ``data:`` lines joined
by newlines, ``event:`` names, ``:`` comments ignored, an event ends at a blank line, and
lines may end in LF, CRLF or CR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class SseEvent:
    data: bytes
    event: str | None = None

    @property
    def is_done(self) -> bool:
        return self.data == DONE


class SseDecoder:
    """Feed raw bytes as they arrive; get back the events completed so far."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        if b"\r" in self._buffer:
            # Normalise CRLF and lone CR, keeping a trailing CR that may be half a CRLF.
            tail = b"\r" if self._buffer.endswith(b"\r") else b""
            body = self._buffer[: len(self._buffer) - len(tail)]
            self._buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[SseEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SseEvent]:
        """End of input: a final event without its blank line still counts."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            if self._data:
                return self._dispatch()
            self._reset()
            return None
        if line.startswith(b":"):
            return None
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> SseEvent:
        event = SseEvent(b"\n".join(self._data), self._event)
        self._reset()
        return event

    def _reset(self) -> None:
        self._data = []
        self._event = None


def encode_data(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def encode_json(payload: Any) -> bytes:
    return encode_data(orjson.dumps(payload))


def encode_error(envelope: dict[str, Any]) -> bytes:
    """An error after the stream committed: the openai SDK raises ``APIError`` on it."""
    return b"event: error\ndata: " + orjson.dumps(envelope) + b"\n\n"
