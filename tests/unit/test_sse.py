import random

import orjson
import pytest

from spillway.wire.sse import DONE_EVENT, SseDecoder, SseEvent, encode_error, encode_json

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
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == [SseEvent(b"a\nb")]


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
