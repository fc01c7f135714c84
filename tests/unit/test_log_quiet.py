"""A request aiohttp cannot parse costs one quiet log line, not a traceback at ERROR: anyone
can send them, without a key, and fill the log."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import BadHttpMessage

from spillway.cli.common import BadRequestsQuietly


def record(error: BaseException | None, level: int = logging.ERROR) -> logging.LogRecord:
    info = (type(error), error, None) if error is not None else None
    return logging.LogRecord("aiohttp.server", level, "x", 1, "Error handling request", (), info)


def test_a_malformed_request_is_one_info_line_without_a_traceback() -> None:
    line = record(BadHttpMessage("Bad Header Line with Bearer sk-secret"))
    assert BadRequestsQuietly().filter(line)
    assert (line.levelno, line.exc_info) == (logging.INFO, None)
    assert line.getMessage() == "refused a malformed HTTP request: BadHttpMessage"


def test_other_errors_keep_their_traceback() -> None:
    line = record(RuntimeError("a bug"))
    assert BadRequestsQuietly().filter(line)
    assert line.levelno == logging.ERROR and line.exc_info is not None
