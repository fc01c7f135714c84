"""Cache keys: a canonical form of what decides the answer, hashed under a tenant-keyed HMAC.

Two requests share an exact key only if the same tenant sent the same model, messages, tools,
response format and sampling parameters; fields that cannot change the answer (``stream``,
``stream_options``, ``user``, ``metadata``, ``store``) are left out. The key is
``HMAC-SHA256(secret, tenant || canonical body)``: without the server's secret nobody can
compute another tenant's key, and a lookup for one tenant can never land on another's entry.

Text is normalised before hashing so trivial differences still hit: Unicode NFC, every
Unicode space as an ASCII space, CRLF as LF, runs of spaces after a line's first word as one,
and no trailing or edge whitespace. Not NFKC: it folds "x²" into "x2" and changes what a
prompt asks. Leading indentation is kept because in code it is meaning.

The semantic *scope* hashes everything except the last user turn's text, so a semantic match
is only ever looked for among entries whose system prompt, earlier turns and parameters are
exactly the same as this request's.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson

#: Request fields that cannot change the answer (transport and bookkeeping only).
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store"})
#: Unicode space separators (no-break, ideographic, thin...): shown as spaces, typed as others.
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_RUNS = re.compile(r"(?<=\S)[ ]{2,}")
_PLACEHOLDER = "\x00last-user-turn\x00"


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """The keys of one request. ``scope`` and ``prompt`` are None when the request cannot be
    matched semantically (its last message is not a plain-text user turn)."""

    exact: str
    scope: str | None
    prompt: str | None


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _UNICODE_SPACES.sub(" ", text)
    lines = [_INNER_RUNS.sub(" ", line).rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def canonical(value: Any) -> Any:
    """Every string normalised, recursively; dict order is settled by sorted serialisation."""
    if isinstance(value, str):
        return normalise_text(value)
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    return value


def derive(secret: bytes, tenant: str, body: dict[str, Any]) -> CacheKeys:
    """The exact key, and the semantic scope and prompt when there is a last user turn."""
    decisive = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    exact = _mac(secret, b"exact", tenant, canonical(decisive))
    prompt = last_user_text(body)
    if prompt is None:
        return CacheKeys(exact, None, None)
    messages = list(decisive["messages"])
    messages[-1] = {**messages[-1], "content": _PLACEHOLDER}
    scope = _mac(secret, b"scope", tenant, canonical({**decisive, "messages": messages}))
    return CacheKeys(exact, scope, normalise_text(prompt))


def last_user_text(body: dict[str, Any]) -> str | None:
    """The last message's text when it is a user turn made only of text, else None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content if content.strip() else None
    if not isinstance(content, list) or not content:
        return None
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            return None  # an image or audio part: text similarity says nothing about it
        if not isinstance(part.get("text"), str):
            return None
        parts.append(part["text"])
    text = "\n".join(parts)
    return text if text.strip() else None


def tag(name: str) -> str:
    """A short, stable, non-secret tag for a tenant or model name (store layouts use it)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _mac(secret: bytes, kind: bytes, tenant: str, payload: Any) -> str:
    mac = hmac.new(secret, kind + b"\x00" + tenant.encode() + b"\x00", hashlib.sha256)
    mac.update(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
    return mac.hexdigest()
