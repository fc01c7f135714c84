"""``[state]``: the Redis that replicas share, and ``[limits]``: how rate limits count.

Kept apart from ``schema.py`` (which imports both) so that each stays one screenful of
concepts; the names are those users write and ``docs/configuration.md`` documents.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from spillway.config.urls import REDIS_SCHEMES, check_scheme


class StateConfig(BaseModel):
    """Shared state (docs/deploy.md): without ``redis_url`` each process keeps its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``redis://[:password@]host:6379/0`` (``rediss://`` for TLS); ``${VAR}`` allowed
    redis_url: SecretStr | None = None
    #: the longest any call to Redis may take; past it the replica uses its local fallback
    timeout_s: float = Field(default=0.25, gt=0, le=1.0)
    #: prefix of every key spillway writes, so that several gateways can share one Redis
    namespace: str = Field(default="spillway", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: a ``max_parallel`` place held by a replica that died is free again after this long
    lease_s: float = Field(default=15.0, ge=3.0, le=30.0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        check_scheme(value, REDIS_SCHEMES, "redis://host:6379/0")
        if value is not None and not _parses(value.get_secret_value()):
            # Never quote the URL: what broke the parse is most likely its password.
            raise ValueError(
                "not a valid Redis URL (redis://[:password@]host:port/db): percent-encode "
                "'/', '#', '?', '@' and ':' in the password (for example %2F for '/')"
            )
        return value


class LimitsConfig(BaseModel):
    """How ``tpm`` counts a request before its real usage is known."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: output tokens a chat request without ``max_tokens`` is counted for until it ends (then
    #: its real usage counts); a request is never refused only for lacking ``max_tokens``
    output_reserve_tokens: int = Field(default=1024, ge=1)


def _parses(url: str) -> bool:
    """The URL splits into a host, a port and a db the way the client will read them."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number (a password's '/', say)
        if parts.scheme == "unix":
            return bool(parts.path)
        db = parts.path.strip("/")
        return bool(parts.hostname) and (db == "" or db.isdigit())
    except ValueError:
        return False
