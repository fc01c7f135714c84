"""The personal-data step of a request: scan it once, before routing, and say where it may go.

``[pii] action`` (or the key's ``pii``) decides: ``block`` refuses it here (400
``pii_detected``), ``private_only`` keeps it on private nodes, ``mask`` hands the dispatcher a
copy for cloud nodes with each finding replaced. Only the kinds and counts are logged, never a
value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from spillway.errors import PiiDetected
from spillway.pii.policy import PiiPolicy, describe
from spillway.pipeline.accounting import Tally
from spillway.pipeline.principal import Principal
from spillway.wire.requests import ChatRequest, EmbeddingsRequest

log = logging.getLogger("spillway.pii")

Request = ChatRequest | EmbeddingsRequest


@dataclass(frozen=True, slots=True)
class Reach:
    """Where a request may go: private nodes only, and what a cloud node gets instead."""

    private_only: bool
    cloud_request: Request | None = None

    @property
    def private_for_cache(self) -> bool:
        """Personal data found (or a private-only key): no cloud embedder may read the
        body, and with ``mask`` the cache sees the original."""
        return self.private_only or self.cloud_request is not None


#: the two answers nearly every request gets, made once
_PRIVATE, _ANYWHERE = Reach(True), Reach(False)


def screen(policy: PiiPolicy, principal: Principal, request: Request, tally: Tally) -> Reach:
    """Raises ``PiiDetected`` when the action is ``block`` and personal data is found. What
    was decided, and the kinds and counts found, go on the request's ledger row."""
    try:
        verdict = policy.check(request.body, principal.pii)
    except PiiDetected as refused:
        tally.found_pii("block", refused.counts)
        log.info(
            "request %s: personal data (%s): block", tally.request_id, describe(refused.counts)
        )
        raise
    if verdict is None:
        return _PRIVATE if principal.private_only else _ANYWHERE
    tally.found_pii(verdict.action, verdict.counts)
    log.info(
        "request %s: personal data (%s): %s",
        tally.request_id,
        describe(verdict.counts),
        verdict.action,
    )
    if verdict.private_only:
        return _PRIVATE
    assert verdict.cloud_body is not None  # mask
    return Reach(principal.private_only, replace(request, body=verdict.cloud_body))
