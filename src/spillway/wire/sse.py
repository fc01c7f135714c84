"""Server-sent events: an incremental decoder for upstream streams and the encoders we send.

Follows the WHATWG event-stream rules that matter for OpenAI streams: ``data:`` lines joined
by newlines, ``event:`` names, ``:`` comments ignored, an event ends at a blank line, and
lines may end in LF, CRLF or CR. A line or an event over ``MAX_EVENT_BYTES`` is refused.
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


#: The longest line, and the most ``data`` in one event, taken from a node. An OpenAI chunk is
#: a few hundred bytes and a tool-call delta a few kilobytes; even a whole 32k-token answer
#: sent as one event (a proxy's "fake streaming") is about 130 KB of English, or 250 KB of
#: Chinese with each character \u-escaped. 1 MiB leaves four times that, and bounds what one
#: stream can make spillway hold.
MAX_EVENT_BYTES = 1 << 20


class SseTooLarge(ValueError):
    """A node sent a line, or one event's data, longer than the decoder's limit.
    ``nodes.http`` turns it into a failure of that node."""

    def __init__(self, limit: int):
        super().__init__(f"sent an SSE line or event larger than {limit} bytes")
        self.limit = limit


class SseDecoder:
    """Feed raw bytes as they arrive; get back the events completed so far.

    The work is linear in the bytes fed: only the new chunk is searched for line ends, and
    the pieces of an unfinished line wait in a list, joined once when the line ends.
    (Appending to one buffer and splitting all of it on every chunk is quadratic in the
    line's length: a node sending one endless line kept a core busy.) An unfinished line, or
    an event's data, over ``max_event_bytes`` raises ``SseTooLarge``."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._limit = max_event_bytes
        self._partial: list[bytes] = []
        self._partial_size = 0
        #: the last chunk ended in CR, so an LF at the start of the next is that CR's CRLF
        self._after_cr = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if not chunk:
            return []
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = chunk.split(b"\n")
        if lines and self._partial:  # the chunk ends the line earlier chunks began
            lines[0] = self._end_partial(lines[0])
        events: list[SseEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        if rest:
            self._keep_partial(rest)
        return events

    def close(self) -> list[SseEvent]:
        """End of input: a final event without its blank line still counts."""
        events = self.feed(b"\n") if self._partial else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _keep_partial(self, piece: bytes) -> None:
        self._partial_size += len(piece)
        if self._partial_size > self._limit:
            raise SseTooLarge(self._limit)
        self._partial.append(piece)

    def _end_partial(self, last: bytes) -> bytes:
        self._partial.append(last)
        line = b"".join(self._partial)
        self._partial = []
        self._partial_size = 0
        return line

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
            self._data_size += len(value) + 1
            if self._data_size > self._limit:
                raise SseTooLarge(self._limit)
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
        self._data_size = 0
        self._event = None


def encode_data(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def encode_json(payload: Any) -> bytes:
    return encode_data(orjson.dumps(payload))


def encode_error(envelope: dict[str, Any]) -> bytes:
    """An error after the stream committed: the openai SDK raises ``APIError`` on it."""
    return b"event: error\ndata: " + orjson.dumps(envelope) + b"\n\n"
