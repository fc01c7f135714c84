"""Client API keys: what a key may do (``KeyPolicy``), written in ``[[keys]]`` (``KeyConfig``)
or kept for a managed key in the database; and a key's spending limit (``BudgetConfig``).

Kept apart from ``schema.py`` (which imports them); the names are those users write and
``docs/configuration.md`` documents.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from spillway.config.privacy import PiiAction
from spillway.prices import Currency

#: a tenant's (and a node's) name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BudgetConfig(_Frozen):
    """A spending limit for one API key, reserved before each call and settled after it."""

    amount: Decimal = Field(gt=0)
    currency: Currency = "USD"
    period: Literal["day", "month"] = "month"


class KeyPolicy(_Frozen):
    """What a client key may do: the same fields for ``[[keys]]`` and for managed keys
    (``spillway keys create``, ``/admin/keys``), which keep theirs in the database."""

    private_only: bool = False
    #: may read /admin endpoints
    admin: bool = False
    budget: BudgetConfig | None = None
    #: rate limits (docs/configuration.md#rate-limits): requests and tokens per minute, and
    #: requests in flight at once; fleet-wide with ``[state] redis_url``
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)
    #: this key's personal-data action, instead of ``[pii] action``
    pii: PiiAction | None = None
    #: the public models this key may use (and see in /v1/models); None: all of them
    models: tuple[str, ...] | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("name at least one model, or leave models out for all of them")
        return value


def check_tenant(value: str) -> str:
    if not NAME.match(value):
        raise ValueError("use letters, digits, '.', '_' or '-' (at most 64)")
    return value


class KeyConfig(KeyPolicy):
    """A client API key written in ``spillway.toml``, and what it may do."""

    key: SecretStr
    tenant: str

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("too short: use at least 8 characters")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant(value)

    @property
    def policy(self) -> KeyPolicy:
        return KeyPolicy(**{name: getattr(self, name) for name in KeyPolicy.model_fields})
