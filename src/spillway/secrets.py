"""Keeping secrets out of everything spillway says: error bodies, logs, metrics.

The Redactor knows every secret in the configuration (node API keys, node headers, proxy
credentials, client keys, passwords in storage URLs) and replaces any occurrence with a mask.
Errors pass through it before they leave the process, and a logging filter applies it to
every log record.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from spillway.config.proxies import NO_PROXY, parse_proxy_url
from spillway.config.schema import Config, NodeConfig

MASK = "***"
#: A node header value shorter than this is not scrubbed: it cannot be a credential worth
#: the name ("1", "true"), and masking it everywhere would garble every log line.
MIN_HEADER_SECRET = 8
#: Looks like a provider key even when we were never told it (an upstream echoing its own),
#: in any case, and also half masked as providers quote it ("sk-proj-****abcd").
_KEY_SHAPES = re.compile(
    r"(?:\b|(?<=%[0-9A-Fa-f]{2}))(sk|pk|rk|hs)-[A-Za-z0-9_\-*]{12,}|sk-spw-[A-Za-z0-9_\-]{9,}",
    re.IGNORECASE,
)
#: A secret at least this long is a credential whose pieces give it away too: a token that
#: holds its first FRAGMENT_HEAD or last FRAGMENT_TAIL characters is masked as well, so an
#: upstream that echoes its key cut, spaced or partly starred does not leak it.
MIN_FRAGMENTED = 20
FRAGMENT_HEAD, FRAGMENT_TAIL = 10, 6
#: what a key-like token around a fragment is made of ("=" only after it: base64 padding,
#: never the "key=" in front of it)
_BEFORE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-*.+/")
_AFTER = _BEFORE | {"="}
MAX_TOKEN = 256


class Redactor:
    """Masks every configured secret, in any case, and the head or tail of a long one.

    Lower-cased substring search (``in``, in C) finds them: a regular expression over a few
    hundred keys and their pieces cost milliseconds per KB, and this runs on every log line.
    """

    def __init__(self, secrets: Iterable[str]):
        unique = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = unique
        #: (lower-cased needle, whether it is a piece to widen to its whole token), longest
        #: first, so a key that contains another is masked whole
        self._needles = [(secret.lower(), False) for secret in unique]
        self._needles += [(piece.lower(), True) for s in unique for piece in _fragments(s)]

    @classmethod
    def for_config(cls, config: Config) -> Redactor:
        secrets = [k.key.get_secret_value() for k in config.keys]
        for node in config.nodes.values():
            secrets += node_secrets(node)
        cache = config.cache
        storage = config.storage
        for secret in (
            cache.secret,
            config.server.secret,
            storage.access_key_id,
            storage.secret_access_key,
        ):
            if secret is not None:
                secrets.append(secret.get_secret_value())
        for url in (cache.redis_url, cache.pgvector_url, config.ledger.url, config.state.redis_url):
            password = urlsplit(url.get_secret_value()).password if url else None
            if password:
                secrets.append(password)
        return cls(secrets)

    def scrub(self, text: str) -> str:
        # Exactly as configured first: lower-casing is not always one character for one
        # (İ, a final Σ), so the search below may miss what this pass cannot.
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        lowered = text.lower()
        if any(needle in lowered for needle, _ in self._needles):
            text = self._mask(text, lowered)
        return _KEY_SHAPES.sub(MASK, text)

    def _mask(self, text: str, lowered: str) -> str:
        if len(lowered) != len(text):  # lower() changed a length (a rare letter such as İ)
            lowered = "".join(c.lower()[:1] or " " for c in text)
        spans: list[tuple[int, int]] = []
        for needle, piece in self._needles:
            start = lowered.find(needle)
            while start != -1:
                end = start + len(needle)
                spans.append(_widened(text, start, end) if piece else (start, end))
                start = lowered.find(needle, end)
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start < merged[-1][1]:  # overlaps the last: one mask for both
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, at = [], 0
        for start, end in merged:
            out += [text[at:start], MASK]
            at = end
        return "".join(out) + text[at:]

    def excerpt(self, text: str, limit: int, mark: str = "") -> str:
        """At most ``limit`` characters of ``text`` fit to show, ``mark`` added if it was cut.
        Scrubbed whole, then cut: cut first, a secret split at the cut would no longer be
        recognised, and its first half would go out."""
        text = self.scrub(text)
        return text if len(text) <= limit else text[:limit] + mark


def _widened(text: str, start: int, end: int) -> tuple[int, int]:
    """The whole token around ``text[start:end]``, up to MAX_TOKEN characters each way (a
    key is shorter; a longer run is not a key, and walking it would cost)."""
    low, high = max(0, start - MAX_TOKEN), min(len(text), end + MAX_TOKEN)
    while start > low and text[start - 1] in _BEFORE:
        start -= 1
    while end < high and text[end] in _AFTER:
        end += 1
    return start, end


def _fragments(secret: str) -> list[str]:
    """The head and tail of a long secret, where each is distinctive enough (at least four
    different characters) not to match ordinary text such as a run of zeros."""
    if len(secret) < MIN_FRAGMENTED:
        return []
    pieces = (secret[:FRAGMENT_HEAD], secret[-FRAGMENT_TAIL:])
    return [piece for piece in pieces if len(set(piece.lower())) >= 4]


def node_secrets(node: NodeConfig) -> list[str]:
    """What about one node must never be shown: its key, its headers' values, and its
    proxy's password (as written, decoded, and inside the Basic credentials)."""
    secrets = [node.api_key.get_secret_value()] if node.api_key else []
    secrets += [
        value
        for header in node.headers.values()
        if len(value := header.get_secret_value()) >= MIN_HEADER_SECRET
    ]
    proxy = node.proxy.get_secret_value() if node.proxy else NO_PROXY
    if proxy != NO_PROXY:
        parsed = parse_proxy_url(proxy)
        if parsed.password:
            raw = urlsplit(proxy if "://" in proxy else f"http://{proxy}").password or ""
            secrets += [raw, parsed.password, parsed.basic_credentials or ""]
    return secrets


class RedactingFilter(logging.Filter):
    """Masks secrets in every record that passes a handler."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self._redactor.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self._redactor.scrub(
                logging.Formatter().formatException(record.exc_info)
            )
            record.exc_info = None
        return True


def redacted_url(url: str) -> str:
    """``url`` with its password masked, in the authority or as ``?password=``: fit for an
    error message or a log line (Redis and PostgreSQL URLs alike)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(^|&)password=[^&]*", rf"\1password={MASK}", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def secret_file(path: Path) -> str:
    """The secret kept in ``path`` (hex text), made on first use: 32 random bytes, readable
    by this user only, written whole under a temporary name and linked into place, so that
    processes starting at once agree on one and none reads a half-written file. Raises
    ``OSError`` when the file cannot be made or read."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{secrets.token_hex(8)}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_bytes(32).hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(partial, path)  # fails if another process got there first: use theirs
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_text().strip()
