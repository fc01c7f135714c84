"""What a request holding personal data may do: ``[pii] action``, or the key's ``pii``.

- ``off``: nothing is scanned.
- ``private_only``: the request goes to private nodes only; with none able to answer, it
  fails closed (503), never to a cloud node.
- ``block``: 400 ``pii_detected``, naming the kinds and counts found, never the values.
- ``mask``: private nodes get the request as sent; a cloud node gets it with each finding
  replaced by its kind (``[MOBILE]``), so nothing personal leaves the private fleet.

Fail closed: a request that cannot be scanned is not let through unscanned; the scan is
pure computation over a body already parsed and bounded, so it has no other way to fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spillway.config.privacy import PiiAction, PiiConfig
from spillway.errors import PiiDetected
from spillway.pii.detectors import BUILT_IN, Scanner, custom_detector
from spillway.pii.scan import scan_body

__all__ = ["PiiAction", "PiiPolicy", "PiiVerdict", "describe", "ledger_kinds", "policy_for"]


@dataclass(frozen=True, slots=True)
class PiiVerdict:
    """Personal data was found and the request may go on: how (``private_only`` or ``mask``),
    what was found, and for ``mask`` the body a cloud node gets instead."""

    action: PiiAction
    counts: dict[str, int]
    cloud_body: dict[str, Any] | None = None

    @property
    def private_only(self) -> bool:
        return self.action == "private_only"


class PiiPolicy:
    """The configured action and the scanner; ``check`` once per request, before routing."""

    def __init__(self, action: PiiAction, scanner: Scanner):
        self.action = action
        self._scanner = scanner

    def check(self, body: dict[str, Any], key_action: PiiAction | None) -> PiiVerdict | None:
        """None: nothing to do (off, or nothing found). Raises ``PiiDetected`` for ``block``."""
        action = key_action or self.action
        if action == "off":
            return None
        scan = scan_body(body, self._scanner, want_masked=action == "mask")
        if not scan.found:
            return None
        if action == "block":
            refusal = PiiDetected(
                f"The request holds personal data ({describe(scan.counts)}) and this API key "
                "may not send it. Remove it, or ask for a key whose pii action allows it.",
                param="messages",
            )
            refusal.counts = scan.counts
            raise refusal
        return PiiVerdict(action, scan.counts, scan.masked)


def describe(counts: Mapping[str, int]) -> str:
    """``2 mobile, 1 email``: kinds and counts, never a value."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def ledger_kinds(counts: Mapping[str, int]) -> str:
    """The ledger's and audit trail's form of what was found: ``email=1,mobile=2``."""
    return ",".join(f"{kind}={n}" for kind, n in sorted(counts.items()))


def policy_for(config: PiiConfig) -> PiiPolicy:
    """``[pii]`` as a policy: the built-in kinds and the operator's own patterns."""
    custom = tuple(custom_detector(c.name, c.pattern) for c in config.custom)
    return PiiPolicy(config.action, Scanner(BUILT_IN + custom))
