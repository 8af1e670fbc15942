"""Tenants: what each API key's tenant may do (the keys file's ``key=value`` fields) and the
limiter that holds every tenant to it.

A keys-file line is ``KEY TENANT [weight=W] [max_concurrency=N] [rpm=N] [tpm=N] [models=a,b]
[isolate_cache=yes]``.
A tenant's fields may be written on any of its keys' lines (a value given twice must agree);
lines without fields share them. Requests without keys (auth off) are one tenant, "anonymous".

The limits, each checked when a request arrives and refused with 429 (RESOURCE_EXHAUSTED on gRPC),
a Retry-After and the tenant named in the message:

    max_concurrency  requests of the tenant in flight at once (the N+1th is refused)
    rpm              requests admitted in the last 60 s (a sliding window; refusals do not count)
    tpm              tokens admitted in the last 60 s, counted when the request is admitted as
                     prompt tokens + max_tokens for every choice (what the request may use, not
                     what it ends up using); a request that alone needs more than tpm gets 400;
                     one refused for tpm has already counted against rpm

      window:  [now - 60 s, now]  ──  admitted at t1 t2 ... tN
      rpm=N:   the N+1th waits until t1 + 60 s  (Retry-After = ceil(t1 + 60 - now))

``weight`` is the tenant's share under contention (fair admission in the gateway, and the decode
workers' waiting queues); ``models`` the models its keys may use (others: 404 model_not_found).

The prefix cache: a request's ``cache_salt`` (vLLM's) is namespaced by its tenant, so no other
tenant can name the same salt and share (or time) its cached prompts; ``isolate_cache=yes`` salts
every request of the tenant that way, so its prompts are cached for it alone without a client
change. A tenant's requests without a salt share blocks with every such request of other tenants.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scalellm.types import TenantShare
from services.gateway.request import ErrorKind, GatewayError, invalid

WINDOW_S = 60.0
"""The rpm and tpm window."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tenant:
    """One tenant's share and limits; None: no such limit."""

    name: str
    weight: float = 1.0
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: frozenset[str] | None = None
    isolate_cache: bool = False

    def __post_init__(self) -> None:
        self.share  # noqa: B018 (checks the weight)
        for name in ("max_concurrency", "rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"tenant {self.name!r}: {name} must be >= 1, got {value}")

    @property
    def share(self) -> TenantShare:
        """Its name and weight as the fair queues take them."""
        return TenantShare(self.name, self.weight)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def cache_salt(self, asked: str | None) -> str | None:
        """The salt a request of this tenant runs under: the client's ``asked`` one within this
        tenant's namespace, or with isolate_cache the tenant's own; None (shared) otherwise."""
        if asked is None and not self.isolate_cache:
            return None
        key = f"{self.name}\0{asked or ''}".encode()
        return hashlib.blake2b(key, digest_size=16, person=b"tenant_salt").hexdigest()

    @classmethod
    def parse(cls, name: str, fields: Sequence[str]) -> Tenant:
        """A tenant from its ``key=value`` fields; ValueError naming a bad one."""
        values = _parse_fields(fields)
        models = values.get("models")
        return cls(
            name=name,
            weight=float(values.get("weight", "1")),
            max_concurrency=_int(values, "max_concurrency"),
            rpm=_int(values, "rpm"),
            tpm=_int(values, "tpm"),
            models=frozenset(m for m in models.split(",") if m) if models is not None else None,
            isolate_cache=_yes(values, "isolate_cache"),
        )


ANONYMOUS = Tenant(name="anonymous")
"""Every request when API keys are off."""

_FIELDS = ("weight", "max_concurrency", "rpm", "tpm", "models", "isolate_cache")


def _parse_fields(fields: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or key not in _FIELDS:
            raise ValueError(f"expected one of {', '.join(f + '=...' for f in _FIELDS)}, got {item!r}")
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = value
    return values


def _int(values: dict[str, str], key: str) -> int | None:
    if key not in values:
        return None
    try:
        return int(values[key])
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {values[key]!r}") from None


def _yes(values: dict[str, str], key: str) -> bool:
    value = values.get(key, "no")
    if value not in ("yes", "no"):
        raise ValueError(f"{key} must be yes or no, got {value!r}")
    return value == "yes"


def merge_fields(name: str, lines: Sequence[Sequence[str]]) -> Tenant:
    """One tenant from the fields on all of its lines; ValueError when two lines disagree."""
    given = [tuple(sorted(f)) for f in lines if f]
    if len(set(given)) > 1:
        raise ValueError(f"tenant {name!r} has different fields on different lines: {sorted(set(given))}")
    return Tenant.parse(name, given[0] if given else ())


# ---- the limiter ---------------------------------------------------------------------------------


class RateLimited(GatewayError):
    """429 / RESOURCE_EXHAUSTED for a tenant over one of its limits, with when to retry."""

    def __init__(self, tenant: Tenant, limit: str, message: str, retry_after_s: float) -> None:
        retry = max(1, math.ceil(retry_after_s))
        super().__init__(
            ErrorKind.OVERLOADED,
            f"tenant {tenant.name!r} {message}; retry after {retry} s",
            code="rate_limit_exceeded",
            retry_after=retry,
        )
        self.tenant = tenant
        self.limit = limit


@dataclass(slots=True)
class _Usage:
    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class TenantLimiter:
    """Every tenant's in-flight count and its requests and tokens in the window. The clock is
    injectable (unit tests step it); all calls run on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def in_flight(self, tenant: Tenant) -> int:
        usage = self._usage.get(tenant.name)
        return usage.in_flight if usage else 0

    def admit(self, tenant: Tenant) -> None:
        """Count one request in flight (release() it at its end); RateLimited over
        max_concurrency or rpm, nothing counted then."""
        usage = self._usage.setdefault(tenant.name, _Usage())
        if tenant.max_concurrency is not None and usage.in_flight >= tenant.max_concurrency:
            raise RateLimited(
                tenant,
                "max_concurrency",
                f"has {usage.in_flight} requests in flight, its limit (max_concurrency={tenant.max_concurrency})",
                1.0,
            )
        if tenant.rpm is not None:
            now = self._clock()
            usage.expire(now)
            if len(usage.requests) >= tenant.rpm:
                raise RateLimited(
                    tenant,
                    "rpm",
                    f"made {len(usage.requests)} requests in the last minute, its limit (rpm={tenant.rpm})",
                    usage.requests[0] + WINDOW_S - now,
                )
            usage.requests.append(now)
        usage.in_flight += 1

    def release(self, tenant: Tenant) -> None:
        self._usage[tenant.name].in_flight -= 1

    def charge_tokens(self, tenant: Tenant, tokens: int) -> None:
        """Count a request's tokens against tpm; RateLimited when the window has no room yet
        (nothing counted), 400 when the request alone is larger than tpm."""
        if tenant.tpm is None:
            return
        if tokens > tenant.tpm:
            raise invalid(
                f"the request needs {tokens} tokens (prompt + max_tokens per choice), more than "
                f"tenant {tenant.name!r} may use in a minute (tpm={tenant.tpm}): lower max_tokens",
                "max_tokens",
                "rate_limit_exceeded",
            )
        usage = self._usage.setdefault(tenant.name, _Usage())
        now = self._clock()
        usage.expire(now)
        if usage.token_sum + tokens > tenant.tpm:
            excess, wait = usage.token_sum + tokens - tenant.tpm, WINDOW_S
            for at, n in usage.tokens:  # the oldest entries leave the window first
                excess -= n
                if excess <= 0:
                    wait = at + WINDOW_S - now
                    break
            raise RateLimited(
                tenant,
                "tpm",
                f"used {usage.token_sum} of its {tenant.tpm} tokens in the last minute (tpm) and "
                f"this request needs {tokens}",
                wait,
            )
        usage.tokens.append((now, tokens))
        usage.token_sum += tokens
