"""``[pii]``: what a request holding personal data may do, and ``[server.cors]``: which
browser origins may call spillway.

Kept apart from ``schema.py`` (which imports both); the names are those users write and
``docs/configuration.md`` documents.
"""

from __future__ import annotations

import re
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

PiiAction = Literal["off", "private_only", "block", "mask"]
PII_ACTIONS: tuple[PiiAction, ...] = get_args(PiiAction)
#: the built-in kinds (``pii/detectors.py``); a custom pattern may not take their names
BUILT_IN_KINDS = ("resident_id", "bank_card", "mobile", "email")


class CustomPattern(BaseModel):
    """``[[pii.custom]]``: an operator's own kind of personal data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    #: a Python regular expression; every match is a finding
    pattern: str = Field(min_length=1, max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value in BUILT_IN_KINDS:
            raise ValueError(f"{value!r} is a built-in kind; give the pattern another name")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.match(""):
            raise ValueError("matches empty text, so it would match everywhere")
        return value


class PiiConfig(BaseModel):
    """Personal-data rules (docs/security.md#personal-data): off unless set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: PiiAction = "off"
    custom: tuple[CustomPattern, ...] = ()


class CorsConfig(BaseModel):
    """Browser clients (docs/security.md#cors): exact origins only; none by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: such as "https://app.example.com"; scheme, host and port only, no "*"
    allow_origins: tuple[str, ...] = ()
    #: how long a browser may reuse a preflight's answer
    max_age_s: int = Field(default=600, ge=0, le=86400)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_origin(item) for item in value)


def _origin(text: str) -> str:
    """An exact origin, as browsers send it: lower-case scheme and host, no trailing slash."""
    if text.strip() == "*":
        raise ValueError(
            '"*" is not allowed: spillway answers with credentials (the API key), and a '
            "browser refuses a wildcard with credentials; list each origin"
        )
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an origin such as https://app.example.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{text!r}: an origin is scheme://host[:port], with no path")
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host  # IPv6, bracketed as browsers send it
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{parts.port}" if parts.port not in (None, default) else ""  # as browsers do
    return f"{parts.scheme}://{host}{port}"
