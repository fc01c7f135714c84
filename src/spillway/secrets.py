"""Keeping secrets out of everything spillway says: error bodies, logs, metrics.

The Redactor knows every secret in the configuration (node API keys, node headers, proxy
credentials, client keys, passwords in storage URLs) and replaces any occurrence with a mask.
Errors pass through it before they leave the process, and a logging filter applies it to
every log record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from spillway.config.proxies import NO_PROXY, parse_proxy_url
from spillway.config.schema import Config, NodeConfig

MASK = "***"
#: A node header value shorter than this is not scrubbed: it cannot be a credential worth
#: the name ("1", "true"), and masking it everywhere would garble every log line.
MIN_HEADER_SECRET = 8
#: Looks like a provider key even when we were never told it (an upstream echoing its own).
_KEY_SHAPES = re.compile(r"\b(sk|pk|rk|hs)-[A-Za-z0-9_\-]{12,}\b")


class Redactor:
    def __init__(self, secrets: Iterable[str]):
        # Longest first, so a key that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def for_config(cls, config: Config) -> Redactor:
        secrets = [k.key.get_secret_value() for k in config.keys]
        for node in config.nodes.values():
            secrets += node_secrets(node)
        cache = config.cache
        if cache.secret is not None:
            secrets.append(cache.secret.get_secret_value())
        for url in (cache.redis_url, cache.pgvector_url, config.ledger.url, config.state.redis_url):
            password = urlsplit(url.get_secret_value()).password if url else None
            if password:
                secrets.append(password)
        return cls(secrets)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _KEY_SHAPES.sub(MASK, text)

    def excerpt(self, text: str, limit: int, mark: str = "") -> str:
        """At most ``limit`` characters of ``text`` fit to show, ``mark`` added if it was cut.
        Scrubbed whole, then cut: cut first, a secret split at the cut would no longer be
        recognised, and its first half would go out."""
        text = self.scrub(text)
        return text if len(text) <= limit else text[:limit] + mark


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
