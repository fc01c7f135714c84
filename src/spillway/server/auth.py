"""Bearer-key authentication: a key maps to a tenant and its policy."""

from __future__ import annotations

import hashlib

from spillway.config.schema import KeyConfig
from spillway.errors import AuthenticationFailed
from spillway.pipeline.principal import ANONYMOUS, Principal
from spillway.state.buckets import KeyLimits


class KeyRing:
    """Looks keys up by their SHA-256, so the secret itself is never a dict key or log field."""

    def __init__(self, keys: tuple[KeyConfig, ...]):
        self._by_digest = {_digest(k.key.get_secret_value()): _principal(k) for k in keys}

    @property
    def open(self) -> bool:
        return not self._by_digest

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key. Send it as the header 'Authorization: Bearer <key>'."
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed(
                "Malformed Authorization header. Use 'Authorization: Bearer <key>'."
            )
        try:
            digest = _digest(token.strip())
        except UnicodeEncodeError:
            # aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which have
            # no UTF-8 form; no configured key can be such a string.
            raise AuthenticationFailed(
                "The API key is not valid UTF-8 text. Send the key exactly as it was issued."
            ) from None
        # A lookup by digest leaks nothing useful through timing: a caller cannot steer
        # the digest of a guess towards a stored one.
        principal = self._by_digest.get(digest)
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal


def _principal(key: KeyConfig) -> Principal:
    digest = _digest(key.key.get_secret_value())
    limits = KeyLimits(key.rpm, key.tpm, key.max_parallel)
    return Principal(
        key.tenant,
        key.private_only,
        key.admin,
        key_id_of(digest),
        limits if limits.any else None,
        key.pii,
        frozenset(key.models) if key.models is not None else None,
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def key_id_of(digest: bytes) -> str:
    return digest.hex()[:16]


def key_id(secret: str) -> str:
    """The ledger's name for a key: the first 16 hex digits of its SHA-256."""
    return key_id_of(_digest(secret))
