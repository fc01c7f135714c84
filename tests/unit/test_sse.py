import random
import tracemalloc

import orjson
import pytest

from spillway.wire.sse import (
    DONE_EVENT,
    MAX_EVENT_BYTES,
    SseDecoder,
    SseEvent,
    SseTooLarge,
    encode_error,
    encode_json,
)

STREAM = (
    b": ping\n\n"
    b'data: {"id":"c1","choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n'
    b"event: note\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data: lone\rdata: cr\r\r"
    b"data:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SseEvent(b'{"id":"c1","choices":[{"delta":{"content":"h\xc3\xa9"}}]}'),
    SseEvent(b"line one\nline two", "note"),
    SseEvent(b"lone\ncr"),
    SseEvent(b"no-space"),
    SseEvent(b"[DONE]"),
]


def decode(chunks: list[bytes]) -> list[SseEvent]:
    decoder = SseDecoder()
    events: list[SseEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def test_whole_stream_decodes_to_expected_events() -> None:
    assert decode([STREAM]) == EXPECTED


def test_every_two_way_split_gives_the_same_events() -> None:
    for cut in range(len(STREAM) + 1):
        assert decode([STREAM[:cut], STREAM[cut:]]) == EXPECTED, f"split at byte {cut}"


def test_byte_at_a_time_gives_the_same_events() -> None:
    assert decode([bytes([b]) for b in STREAM]) == EXPECTED


def test_random_chunking_gives_the_same_events() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 12)))
        chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert decode(chunks) == EXPECTED, f"cuts {cuts}"


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    # A CR ends its line at once (no waiting for the next chunk); an LF that follows it,
    # in the same chunk or the next, belongs to it and is no blank line of its own.
    assert decoder.feed(b"\n\r") == [SseEvent(b"a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: c\r") == []
    assert decoder.feed(b"\r") == [SseEvent(b"c")]


def test_lone_cr_ends_lines() -> None:
    assert decode([b"data: x\r\rdata: y\r\r"]) == [SseEvent(b"x"), SseEvent(b"y")]


def test_multiline_data_joined_with_newline() -> None:
    assert decode([b"data: a\ndata:\ndata: c\n\n"]) == [SseEvent(b"a\n\nc")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    assert decode([b": ping\n\n:another\nid: 7\nretry: 10\ndata: x\n\n"]) == [SseEvent(b"x")]


def test_event_name_applies_to_its_event_only() -> None:
    events = decode([b"event: error\ndata: {}\n\ndata: next\n\n"])
    assert events == [SseEvent(b"{}", "error"), SseEvent(b"next")]


def test_event_without_data_is_not_dispatched() -> None:
    assert decode([b"event: lonely\n\ndata: x\n\n"]) == [SseEvent(b"x")]


def test_done_detection() -> None:
    assert SseEvent(b"[DONE]").is_done
    assert not SseEvent(b"[DONE] ").is_done
    assert not SseEvent(b'{"x": "[DONE]"}').is_done
    assert decode([DONE_EVENT])[0].is_done


@pytest.mark.parametrize(
    "tail", [b"data: last", b"data: last\n", b"data: last\r", b"data: last\r\n"]
)
def test_close_flushes_final_event_without_blank_line(tail: bytes) -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: first\n\n" + tail) == [SseEvent(b"first")]
    assert decoder.close() == [SseEvent(b"last")]


def test_close_on_empty_decoder_gives_nothing() -> None:
    assert SseDecoder().close() == []


def test_encode_error_parses_back() -> None:
    envelope = {"error": {"message": "boom\nsecond line", "type": "x", "param": None, "code": 1}}
    [event] = decode([encode_error(envelope)])
    assert event.event == "error"
    assert orjson.loads(event.data) == envelope


def test_encode_json_parses_back() -> None:
    payload = {"choices": [{"delta": {"content": "a\r\nb"}}]}
    [event] = decode([encode_json(payload)])
    assert event.event is None
    assert orjson.loads(event.data) == payload


def test_endless_line_is_refused_once_it_passes_the_limit() -> None:
    """A node streaming a 5 MB line with no newline, in 4 KiB reads: the decoder gives up as
    soon as the line passes MAX_EVENT_BYTES instead of buffering (and re-scanning) it all."""
    decoder = SseDecoder()
    piece = b"x" * 4096
    fed = 0
    with pytest.raises(SseTooLarge, match=f"larger than {MAX_EVENT_BYTES} bytes"):
        while fed < 5_000_000:
            chunk = (b"data: " + piece)[:4096] if fed == 0 else piece
            fed += len(chunk)
            decoder.feed(chunk)
    assert MAX_EVENT_BYTES < fed <= MAX_EVENT_BYTES + len(piece)


def test_work_per_chunk_does_not_grow_with_the_unfinished_line() -> None:
    """Linear, counted in bytes allocated: each 4 KiB chunk of a long unfinished line costs a
    few KiB, however long the line already is (copying the whole buffer on every chunk grows
    with it, and made one endless line quadratic)."""
    decoder = SseDecoder()
    piece = b"y" * 4096
    worst = 0
    tracemalloc.start()
    try:
        for _ in range(200):  # 800 KiB, under the limit
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            assert decoder.feed(piece) == []
            worst = max(worst, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert worst < 4 * len(piece)
    assert decoder.close() == []  # a line that is not a field gives no event


def test_long_line_split_across_chunks_is_joined_once_it_ends() -> None:
    value = bytes(range(32, 127)) * 5000  # 475 KB, under the limit
    stream = b"data: " + value + b"\r\n\r\n"
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert decode(chunks) == [SseEvent(value)]


def test_event_data_over_the_limit_is_refused_even_in_short_lines() -> None:
    decoder = SseDecoder(max_event_bytes=1000)
    decoder.feed(b"data: " + b"a" * 400 + b"\n" + b"data: " + b"b" * 400 + b"\n")
    with pytest.raises(SseTooLarge):
        decoder.feed(b"data: " + b"c" * 400 + b"\n")


def test_the_limit_applies_per_event() -> None:
    decoder = SseDecoder(max_event_bytes=1000)
    for i in range(10):
        event = b"data: " + bytes([97 + i]) * 900 + b"\n\n"
        assert decoder.feed(event) == [SseEvent(bytes([97 + i]) * 900)]
