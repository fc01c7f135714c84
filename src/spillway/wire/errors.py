"""Errors in OpenAI's wire format: the body every door and every batch error line uses."""

from __future__ import annotations

from spillway.errors import SpillwayError
from spillway.secrets import Redactor


def error_body(exc: SpillwayError, redactor: Redactor) -> dict[str, object]:
    """OpenAI's ``{"error": {"message", "type", "param", "code"}}``. An error's ``kind`` is
    named after OpenAI's types, so it is the type as it is."""
    return {
        "error": {
            "message": redactor.scrub(exc.message),
            "type": exc.kind,
            "param": exc.param,
            "code": exc.code,
        }
    }
