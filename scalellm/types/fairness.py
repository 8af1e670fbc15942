"""Fair shares across tenants: who goes next when several tenants wait (the gateway's admission
queue and the engine scheduler's waiting queue both ask FairShares).

Start-time fair queuing with a request as the unit of service. Each tenant has a tag, the
service it has had divided by its weight; the waiting tenant with the smallest tag goes next and
its tag grows by 1 / weight. The virtual time is the tag of the last tenant served; a tenant that
had nothing waiting starts again from there, so idling banks no credit:

    weights a=2, b=1, both always waiting:   a a b a a b ...   (tags a: 0 .5 1 1.5 ..., b: 0 1 2 ...)
    c arrives when the virtual time is 7:     c's tag is 7, not 0 (it does not starve a and b)

Within a tenant the caller keeps its own order (priority, then arrival).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TenantShare:
    """Whose request this is and its tenant's weight (its share under contention)."""

    name: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0 or not math.isfinite(self.weight):
            raise ValueError(f"tenant weight must be a positive number, got {self.weight}")


DEFAULT_TENANT = TenantShare()
"""Requests that name no tenant: one tenant among the others."""


class FairShares:
    """The tags of the tenants seen so far (a few floats each)."""

    __slots__ = ("_tags", "_vtime")

    def __init__(self) -> None:
        self._tags: dict[str, float] = {}
        self._vtime = 0.0

    def tag(self, tenant: str) -> float:
        return max(self._tags.get(tenant, 0.0), self._vtime)

    def pick(self, tenants: Iterable[str]) -> str | None:
        """The tenant to serve next among those waiting (the first listed on a tie); None if none."""
        best: tuple[float, str] | None = None
        for tenant in tenants:
            tag = self.tag(tenant)
            if best is None or tag < best[0]:
                best = (tag, tenant)
        return best[1] if best else None

    def charge(self, share: TenantShare, cost: float = 1.0) -> None:
        """One request of this tenant was served."""
        start = self.tag(share.name)
        self._vtime = start
        self._tags[share.name] = start + cost / share.weight
        if len(self._tags) > 4096:  # tenants long idle carry nothing a fresh start would not give
            self._tags = {t: v for t, v in self._tags.items() if v > self._vtime}
