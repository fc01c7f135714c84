"""Bearer-key authentication: a key maps to a tenant and its policy.

Two kinds of key: those written in ``[[keys]]`` (looked up by SHA-256, fixed for the life of
the process) and managed keys (``spillway keys``, ``/admin/keys``), looked up by their HMAC
under the server secret and replaced whole by ``KeySync`` whenever the database's set
changes. Neither the key nor anything that could be turned back into it is a dict key, a
log field or a ledger column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from spillway.access.records import ManagedKey
from spillway.access.tokens import KeyHasher
from spillway.clock import Clock, SystemClock
from spillway.config.keys import KeyConfig, KeyPolicy
from spillway.errors import AuthenticationFailed
from spillway.pipeline.principal import ANONYMOUS, Principal
from spillway.state.buckets import KeyLimits


@dataclass(frozen=True, slots=True)
class _Managed:
    principal: Principal
    prefix: str
    #: wall-clock seconds after which the key no longer works (expiry, or the end of a
    #: rotated key's grace period); None: never
    ends_at: float | None
    #: revoked outright (no grace): refused, with the time it was revoked
    revoked_at: float | None = None


class KeyRing:
    """Looks keys up by digest, so the secret itself is never a dict key or log field."""

    def __init__(self, keys: tuple[KeyConfig, ...], clock: Clock | None = None):
        self._clock = clock or SystemClock()
        self._by_digest = {_digest(k.key.get_secret_value()): _principal(k) for k in keys}
        self._hasher: KeyHasher | None = None
        self._managed: dict[str, _Managed] = {}
        #: the database has held managed keys: the gateway is never open again, even when
        #: none can be read or all have ended
        self._sealed = False
        #: managed keys' prefixes and when each was last used (wall seconds), until
        #: ``KeySync`` takes them for the database
        self.used: dict[str, float] = {}

    @property
    def open(self) -> bool:
        """No key at all, configured or managed, ever: every request is the default tenant."""
        return not self._by_digest and not self._managed and not self._sealed

    def seal(self) -> None:
        """Managed keys exist (or did): keys are required from now on."""
        self._sealed = True

    @property
    def managed_count(self) -> int:
        return len(self._managed)

    def still_valid(self, key_id: str) -> bool:
        """Whether the key named ``key_id`` still works (a batch it submitted may go on): a
        configured key, or a managed key neither revoked nor ended. Open mode's "" too."""
        if not key_id or any(p.key_id == key_id for p in self._by_digest.values()):
            return True
        now = self._clock.wall()
        return any(
            entry.principal.key_id == key_id
            and entry.revoked_at is None
            and (entry.ends_at is None or now < entry.ends_at)
            for entry in self._managed.values()
        )

    def set_managed(self, hasher: KeyHasher, keys: Iterable[ManagedKey]) -> None:
        """Replace the managed keys with ``keys`` (``KeyStore.for_gateway``: the usable ones
        and those that ended lately, which are refused saying so)."""
        self._hasher = hasher
        self._managed = {k.key_hash: _managed(k) for k in keys}
        if self._managed:
            self._sealed = True

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key. Send it as the header 'Authorization: Bearer <key>'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed(
                "Malformed Authorization header. Use 'Authorization: Bearer <key>'."
            )
        try:
            digest = _digest(token)
        except UnicodeEncodeError:
            # aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which have
            # no UTF-8 form; no configured key can be such a string.
            raise AuthenticationFailed(
                "The API key is not valid UTF-8 text. Send the key exactly as it was issued."
            ) from None
        # A lookup by digest leaks nothing useful through timing: a caller cannot steer
        # the digest of a guess towards a stored one.
        principal = self._by_digest.get(digest)
        if principal is not None:
            return principal
        if self._managed and self._hasher is not None:
            return self._managed_principal(self._hasher.hash(token))
        raise AuthenticationFailed("Incorrect API key provided.")

    def _managed_principal(self, key_hash: str) -> Principal:
        entry = self._managed.get(key_hash)
        if entry is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if entry.revoked_at is not None:
            raise AuthenticationFailed(
                f"This API key was revoked at {_iso(entry.revoked_at)}. Ask for a new key."
            )
        now = self._clock.wall()
        if entry.ends_at is not None and now >= entry.ends_at:
            raise AuthenticationFailed(
                f"This API key stopped working at {_iso(entry.ends_at)} (it expired, or the "
                "grace period after its rotation ended). Use its replacement, or ask for a "
                "new key.",
                code="expired_api_key",
            )
        self.used[entry.prefix] = now
        return entry.principal


def principal_for(tenant: str, policy: KeyPolicy, key_id: str) -> Principal:
    limits = KeyLimits(policy.rpm, policy.tpm, policy.max_parallel)
    return Principal(
        tenant,
        policy.private_only,
        policy.admin,
        key_id,
        limits if limits.any else None,
        policy.pii,
        frozenset(policy.models) if policy.models is not None else None,
    )


def _principal(key: KeyConfig) -> Principal:
    return principal_for(key.tenant, key.policy, key_id_of(_digest(key.key.get_secret_value())))


def _managed(key: ManagedKey) -> _Managed:
    ends = key.ends_at()
    revoked = key.revoked_at if key.revoked_at is not None and key.grace_until is None else None
    return _Managed(
        principal_for(key.tenant, key.policy, key.key_id),
        key.prefix,
        None if ends is None else ends.timestamp(),
        None if revoked is None else revoked.timestamp(),
    )


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def key_id_of(digest: bytes) -> str:
    return digest.hex()[:16]


def key_id(secret: str) -> str:
    """The ledger's name for a configured key: the first 16 hex digits of its SHA-256."""
    return key_id_of(_digest(secret))
