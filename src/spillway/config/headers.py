"""What a node's ``auth_header`` and ``headers`` may be: HTTP/1.1 header names and values.

Checked at load, so a bad one names its setting; the node's connection pool checks the
encoded block again before anything is sent. A value may be a secret: no message repeats it.
"""

from __future__ import annotations

import re

#: RFC 9110 token characters: what a header name may be made of.
_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers spillway writes itself (framing, hop-by-hop, the body's type and encoding, the
#: proxy's credentials): a node's ``headers`` cannot replace them.
OWN_HEADERS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
        "trailer", "upgrade", "expect", "content-type", "accept-encoding",
        "proxy-authorization", "proxy-connection",
    }
)  # fmt: skip


def check_header_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
    if name.lower() in OWN_HEADERS:
        raise ValueError(f"{name} is a header spillway sets itself")
    return name


def check_header_value(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"headers.{name}: the value contains a line break or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(
            f"headers.{name}: the value has characters HTTP cannot carry (not latin-1)"
        ) from None
