"""What a managed key looks like, and how it is kept: only its HMAC under the server secret.

A key is ``sk-spw-`` and 43 URL-safe characters (32 random bytes). Its first 15 characters
(``sk-spw-`` and 8 more, 48 random bits) are its public prefix: how ``keys list`` shows it
and how ``revoke`` and ``rotate`` name it. The database holds HMAC-SHA256(secret, key): a
stolen copy of the database gives no key, and without the secret not even a way to test a
guess offline. Every replica and the CLI must hash with the same secret; ``check_value`` is
stored once, so one that has another secret notices instead of refusing every key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from spillway.config.schema import Config
from spillway.errors import StartupError
from spillway.secrets import secret_file

KEY_SCHEME = "sk-spw-"
PREFIX_LENGTH = len(KEY_SCHEME) + 8
_RANDOM_BYTES = 32
KEY_LENGTH = len(KEY_SCHEME) + 43  # token_urlsafe(32): 43 characters
_CHECK_MESSAGE = b"spillway: managed keys are hashed under this secret"
SECRET_FILE = "secret"


def new_key() -> str:
    return KEY_SCHEME + secrets.token_urlsafe(_RANDOM_BYTES)


def prefix_of(key: str) -> str:
    return key[:PREFIX_LENGTH]


def looks_managed(text: str) -> bool:
    """A whole managed key (not just its prefix)."""
    return text.startswith(KEY_SCHEME) and len(text) == KEY_LENGTH


def is_prefix(text: str) -> bool:
    return text.startswith(KEY_SCHEME) and len(text) == PREFIX_LENGTH


def new_key_id() -> str:
    """The ledger's name for a managed key: 16 hex digits, like a configured key's."""
    return secrets.token_hex(8)


class KeyHasher:
    """HMAC-SHA256 under the server secret (``hmac.digest``: one C call, about 1 µs)."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.digest(self._secret, key.encode("utf-8"), hashlib.sha256).hex()

    def check_value(self) -> str:
        """Stored once per database: equal for every process that hashes with this secret."""
        return hmac.digest(self._secret, _CHECK_MESSAGE, hashlib.sha256).hex()


def shared_database(config: Config) -> bool:
    return config.ledger.url is not None and not config.ledger.url.get_secret_value().startswith(
        "sqlite"
    )


def hasher_for(config: Config) -> KeyHasher:
    """``[server] secret``, or the one in DATA_DIR/secret (made on first use). A database
    several machines share needs the configured one: each would make its own file."""
    configured = config.server.secret
    if configured is not None:
        return KeyHasher(configured.get_secret_value().encode("utf-8"))
    if shared_database(config):
        raise StartupError(
            "managed keys in a shared database need [server] secret (the same on every "
            'replica and for the CLI), e.g. secret = "${SPILLWAY_SECRET}" with '
            "SPILLWAY_SECRET from `openssl rand -hex 32`"
        )
    return KeyHasher(_secret_file(config.server.data_dir / SECRET_FILE))


def _secret_file(path: Path) -> bytes:
    """The secret in DATA_DIR/secret (``secrets.secret_file``), as bytes."""
    try:
        value = bytes.fromhex(secret_file(path))
    except OSError as exc:
        raise StartupError(
            f"cannot use {path.name} in the data directory ({type(exc).__name__}): run as the "
            "user the gateway runs as, or set [server] secret"
        ) from None
    except ValueError:
        value = b""
    if len(value) < 32:
        raise StartupError(
            f"{path.name} in the data directory is damaged (not 32 hex bytes); restore it, "
            "or set [server] secret (managed keys hashed under the old one stop working)"
        )
    return value
