"""A batch's input and output lines, in OpenAI's format.

Input, one JSON object a line::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one line per input line that got an answer from a node (``response.status_code``
200), and in the error file one per line that did not (a 4xx or 5xx ``response``, or an
``error`` when it could not be run at all: ``batch_expired``, ``batch_cancelled``)::

    {"id": "batch_req_…", "custom_id": "req-1", "response": {"status_code": 200,
     "request_id": "…", "body": {...}}, "error": null}

Everything here streams: lines are split from the store's chunks as they come, and the
validation pass keeps 16 bytes per line (an 8-byte hash of its ``custom_id``, its place and
its line number: 3.2 MB for 200,000 lines) to find duplicates, sorted with numpy at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from array import array
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from spillway.errors import InvalidRequest, SpillwayError
from spillway.wire.requests import check_chat, check_embeddings

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
MAX_CUSTOM_ID = 512
#: the longest one input line may be (a request body, as for a single request)
MAX_LINE_BYTES = 16 * 1024 * 1024
#: errors a failed validation reports at most (the first ones, by line)
MAX_ERRORS = 100
#: the longest message of one line's error (they are kept with the batch)
MAX_MESSAGE = 300
_YIELD_EVERY = 1000


@dataclass(frozen=True, slots=True)
class LineError:
    line: int  # 1-based, as people count lines in a file
    code: str
    message: str
    param: str | None = None

    def public(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 0-based position among the input's lines
    custom_id: str
    body: dict[str, Any]


@dataclass
class Validation:
    total: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    def add(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """The lines of a stream of chunks, as (line number in the file, counted from 1, as an
    editor shows it; the line without its newline). Blank lines are skipped. A line longer
    than ``MAX_LINE_BYTES`` is yielded cut to that length plus one byte, for the caller to
    refuse without holding it whole."""
    pending = bytearray()
    physical = 0
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            physical += 1
            if len(pending) <= MAX_LINE_BYTES:
                pending += chunk[start : start + MAX_LINE_BYTES + 1 - len(pending)][: end - start]
            if pending.strip():
                yield physical, bytes(pending[: MAX_LINE_BYTES + 1])
            pending.clear()
            start = end + 1
        if len(pending) <= MAX_LINE_BYTES:
            pending += chunk[start : start + MAX_LINE_BYTES + 1 - len(pending)]
    if pending.strip():
        yield physical + 1, bytes(pending)


def read_line(number: int, raw: bytes, endpoint: str) -> BatchLine:
    """One input line, checked as OpenAI checks it; ``InvalidRequest`` says what is wrong."""
    if len(raw) > MAX_LINE_BYTES:
        raise InvalidRequest(
            f"the line is longer than {MAX_LINE_BYTES} bytes", code="line_too_long"
        )
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the line is not valid JSON", code="invalid_json_line") from None
    if not isinstance(item, dict):
        raise InvalidRequest("the line is not a JSON object", code="invalid_json_line")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id must be a non-empty string", param="custom_id",
                             code="missing_custom_id")  # fmt: skip
    if len(custom_id) > MAX_CUSTOM_ID:
        raise InvalidRequest(f"custom_id is longer than {MAX_CUSTOM_ID} characters",
                             param="custom_id", code="invalid_custom_id")  # fmt: skip
    if item.get("method") != "POST":
        raise InvalidRequest("method must be POST", param="method", code="invalid_method")
    if item.get("url") != endpoint:
        raise InvalidRequest(f"url must be {endpoint}, the batch's endpoint", param="url",
                             code="mismatched_url")  # fmt: skip
    body = item.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", param="body", code="invalid_body")
    return BatchLine(number, custom_id, body)


def check_request(line: BatchLine, endpoint: str) -> None:
    """The body as the endpoint would check it, and no streaming (a batch writes files)."""
    if endpoint == "/v1/embeddings":
        check_embeddings(line.body)
        return
    request = check_chat(line.body)
    if request.stream:
        raise InvalidRequest("stream is not supported in a batch", param="body.stream")


async def validate(
    lines: AsyncIterable[tuple[int, bytes]],
    endpoint: str,
    check_model: Callable[[str], str | None],
    max_lines: int,
) -> Validation:
    """Every line checked, before anything runs. ``check_model`` says what is wrong with a
    model (unknown, not this key's, or out of its reach), or None. Errors are reported by
    the line number in the file, the first ``MAX_ERRORS`` of them."""
    result = Validation()
    hashes = bytearray()  # 12 bytes a line: its custom_id's hash and its place
    places = array("I")  # the file line of each place, to name a duplicate's lines
    async for physical, raw in lines:
        number = result.total
        result.total += 1
        if result.total > max_lines:
            result.add(LineError(physical, "too_many_lines",
                                 f"a batch holds at most {max_lines} lines"))  # fmt: skip
            break
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a long file must not hold the event loop
        try:
            line = read_line(number, raw, endpoint)
            check_request(line, endpoint)  # first: it bounds the model name's length
            problem = check_model(str(line.body.get("model", "")))
            if problem is not None:
                raise InvalidRequest(problem, param="body.model", code="model_not_found")
        except SpillwayError as exc:
            message = exc.message[:MAX_MESSAGE]
            result.add(LineError(physical, exc.code or "invalid_request", message,
                                 getattr(exc, "param", None)))  # fmt: skip
            continue
        hashes += _digest(line.custom_id) + len(places).to_bytes(4, "little")
        places.append(physical)
    if result.total == 0:
        result.add(LineError(1, "empty_file", "the input file has no lines"))
    duplicates = Validation()
    for first, again in _duplicates(hashes):
        if len(duplicates.errors) >= MAX_ERRORS:  # counted, not described
            duplicates.error_count += 1
            continue
        duplicates.add(LineError(places[again], "duplicate_custom_id",
                                 f"custom_id repeats the one on line {places[first]}",
                                 "custom_id"))  # fmt: skip
    # the first MAX_ERRORS by line, of both kinds (each list holds its first MAX_ERRORS)
    merged = sorted(result.errors + duplicates.errors, key=lambda e: e.line)
    result.errors = merged[:MAX_ERRORS]
    result.error_count += duplicates.error_count
    return result


def _digest(custom_id: str) -> bytes:
    return hashlib.blake2b(custom_id.encode("utf-8"), digest_size=8).digest()


def _duplicates(entries: bytearray) -> Iterable[tuple[int, int]]:
    """Pairs of line numbers whose custom_id hashes are equal (first, repeat). A 64-bit hash
    collision between different ids is possible in principle (about 1 in 10^9 for 200,000
    lines); it would be reported as a duplicate, never let a real one through."""
    if len(entries) < 2 * 12:
        return []
    packed = np.frombuffer(entries, dtype=[("h", "<u8"), ("n", "<u4")])
    ordered = packed[np.argsort(packed["h"], kind="stable")]
    hashes, numbers = ordered["h"], ordered["n"]
    starts = np.empty(len(hashes), dtype=bool)
    starts[0], starts[1:] = True, hashes[1:] != hashes[:-1]
    # each entry's run start (the first line with that id), without a loop over the runs
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(hashes)), 0))
    repeats = np.flatnonzero(~starts)
    return [(int(numbers[run_start[j]]), int(numbers[j])) for j in repeats]


def request_line_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def output_line(custom_id: str, request_id: str, status: int, body: bytes) -> bytes:
    """A line of the output (status 200) or error file with the node's (or spillway's)
    answer; ``body`` is that answer's JSON, copied as it is unless it spans lines (a node
    that pretty-prints), which one line per answer cannot hold."""
    if b"\n" in body or b"\r" in body:
        body = orjson.dumps(orjson.loads(body))
    head = orjson.dumps({"id": request_line_id(), "custom_id": custom_id})[:-1]
    response = orjson.dumps({"status_code": status, "request_id": request_id})[:-1]
    return head + b',"response":' + response + b',"body":' + body + b'},"error":null}\n'


def unrun_line(custom_id: str, code: str, message: str) -> bytes:
    """A line of the error file for a request that was never run."""
    error = {"code": code, "message": message}
    item = {"id": request_line_id(), "custom_id": custom_id, "response": None, "error": error}
    return orjson.dumps(item) + b"\n"
