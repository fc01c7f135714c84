"""A managed key as the database keeps it, and the few values people type for one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import Field, ValidationError, field_validator

from spillway.config.keys import BudgetConfig, KeyPolicy, check_tenant
from spillway.wire.requests import CONTROL_CHARS


@dataclass(frozen=True, slots=True)
class ManagedKey:
    """One issued key: never the key itself, only its prefix and its HMAC."""

    prefix: str
    key_hash: str
    key_id: str
    tenant: str
    name: str | None
    policy: KeyPolicy
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    #: a rotated key works until then though revoked (None: no grace)
    grace_until: datetime | None = None
    last_used_at: datetime | None = None
    #: the prefix of the key that replaced this one (``rotate``)
    replaced_by: str | None = None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None and not self.in_grace(now):
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def in_grace(self, now: datetime) -> bool:
        return self.grace_until is not None and self.grace_until > now

    def ends_at(self) -> datetime | None:
        """When a usable key stops working by itself: its expiry, or its grace's end."""
        ends = [at for at in (self.expires_at, self.grace_until) if at is not None]
        return min(ends, default=None)

    def public(self, now: datetime) -> dict[str, Any]:
        """What ``keys list`` and ``/admin/keys`` show: everything but the hash."""
        return {
            "prefix": self.prefix,
            "key_id": self.key_id,
            "tenant": self.tenant,
            "name": self.name,
            "state": self.state(now),
            **self.policy.model_dump(mode="json"),
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "grace_until": _iso(self.grace_until),
            "last_used_at": _iso(self.last_used_at),
            "replaced_by": self.replaced_by,
        }


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just made: the only time the key itself exists outside its holder."""

    key: str
    record: ManagedKey


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$")
#: the longest duration accepted (an expiry, a grace period, a look back): 100 years
MAX_DURATION = timedelta(days=36_500)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d{1,6})?)\s*(USD|CNY)?\s*/\s*(day|month)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s``."""
    match = _DURATION.match(text)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"'{text}' is not a duration: write a positive number and s, m, h, d or w")
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"'{text}' is longer than 100 years")
    return timedelta(seconds=seconds)


def parse_budget(text: str) -> BudgetConfig:
    """``50/month``, ``300CNY/day``, ``12.5 USD/month``."""
    match = _BUDGET.match(text)
    if match is None or Decimal(match[1]) <= 0:
        raise ValueError(
            f"'{text}' is not a budget: write AMOUNT[USD|CNY]/day or AMOUNT[USD|CNY]/month"
        )
    currency = (match[2] or "USD").upper()
    return BudgetConfig.model_validate(
        {"amount": Decimal(match[1]), "currency": currency, "period": match[3].lower()}
    )


class KeyRequest(KeyPolicy):
    """A request for a new key, as ``/admin/keys`` takes it (the CLI builds the same):
    the key's tenant, name and lifetime, and its policy (``budget`` may be ``"50/month"``)."""

    tenant: str
    name: str | None = Field(default=None, max_length=200)
    #: how long the key works: ``30d``, ``12h`` …; None: until revoked
    expires_in: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and CONTROL_CHARS.search(value):
            raise ValueError("no control characters (line breaks, escapes)")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return parse_budget(value) if isinstance(value, str) else value

    @field_validator("expires_in")
    @classmethod
    def _expires_in(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def policy(self) -> KeyPolicy:
        return KeyPolicy(**{name: getattr(self, name) for name in KeyPolicy.model_fields})

    def expires_at(self, now: datetime) -> datetime | None:
        return None if self.expires_in is None else now + parse_duration(self.expires_in)


def unserved_models(policy: KeyPolicy, served: Iterable[str]) -> list[str]:
    """The models a key names that no node serves (a typo would lock it out silently)."""
    known = set(served)
    return [m for m in policy.models or () if m not in known]


def explain(error: ValidationError) -> str:
    """A pydantic error as one line that names each field and what is wrong with it."""
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)
