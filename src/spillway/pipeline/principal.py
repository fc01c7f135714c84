"""Who is asking: the tenant and policy an authenticated key maps to."""

from __future__ import annotations

from dataclasses import dataclass

from spillway.config.privacy import PiiAction
from spillway.state.buckets import KeyLimits


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    private_only: bool
    admin: bool = False
    #: a short digest naming the key in the ledger and budgets; never the key itself
    key_id: str = ""
    #: the key's rpm, tpm and max_parallel; None when it has none
    limits: KeyLimits | None = None
    #: the key's personal-data action; None: ``[pii] action``
    pii: PiiAction | None = None
    #: the public models the key may use; None: every one
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


#: Who a request is when the gateway has no keys configured (open mode).
ANONYMOUS = Principal(tenant="default", private_only=False)
