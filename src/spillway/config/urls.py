"""The URL schemes each setting accepts, checked without reading the (secret) rest."""

from __future__ import annotations

from pydantic import SecretStr

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
PG_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})
LEDGER_SCHEMES = frozenset(
    {"sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg"}
)


def check_scheme(
    value: SecretStr | None, schemes: frozenset[str], example: str
) -> SecretStr | None:
    """``value`` unchanged, or ValueError naming its scheme and an ``example`` to follow."""
    if value is None:
        return None
    scheme = value.get_secret_value().split(":", 1)[0]
    if scheme not in schemes:
        raise ValueError(f"unsupported URL scheme '{scheme}': use {example}")
    return value
