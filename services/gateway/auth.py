"""API keys: a file of keys mapped to tenants, checked on every route but /health.

File format, one key per line: ``KEY TENANT`` (whitespace between; TENANT defaults to "default").
Blank lines and lines starting with ``#`` are skipped. The file is refused when users other than
its owner (and group) can read it, like any secret file (scalellm/security/files.py).

Keys are kept only as SHA-256 digests, in a dict from digest to tenant. Is the lookup constant
time? Not literally: the dict hashes the digest and compares it with the entries in one bucket,
and how long that takes depends on the digest. But the digest is of the *presented* key, and what
the timing could reveal is how a stored digest relates to it (a shared prefix, a bucket). Turning
that into a key would need a SHA-256 preimage, so the timing tells an attacker nothing they can
use, whatever they send; and the process never holds a key in clear. A lookup costs one SHA-256
and one dict probe (about a microsecond) however many keys there are, where comparing with
``hmac.compare_digest`` against every stored key would grow with their number.

A refusal says why (``AuthFailure``: missing, malformed, unknown), which the gateway counts in
/metrics; neither the key nor its digest is ever logged or counted.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

from scalellm.security import check_private
from services.gateway.errors import ErrorKind, GatewayError

ANONYMOUS = "anonymous"


class AuthFailure(enum.Enum):
    """Why a request was refused (the label of scalellm_gateway_auth_failures)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"


class KeyRefused(GatewayError):
    """UNAUTHENTICATED, with the reason."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(ErrorKind.UNAUTHENTICATED, message, code="invalid_api_key")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest of each key -> its tenant. Empty means authentication is off."""

    tenants: dict[bytes, str]

    @classmethod
    def disabled(cls) -> ApiKeys:
        return cls({})

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a keys file; ValueError on a malformed one or one others can read (a gateway must
        not start open by mistake)."""
        tenants: dict[bytes, str] = {}
        text = check_private(path, "API keys file").read_text(encoding="utf-8")
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"{path}:{lineno}: expected 'KEY [TENANT]', got {len(parts)} fields")
            tenants[_digest(parts[0])] = parts[1] if len(parts) == 2 else "default"
        if not tenants:
            raise ValueError(f"{path} holds no API keys")
        return cls(tenants)

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization: Bearer KEY`` value; KeyRefused if none."""
        if not self.tenants:
            return ANONYMOUS
        if not authorization:
            raise KeyRefused(AuthFailure.MISSING, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise KeyRefused(AuthFailure.MALFORMED, "malformed Authorization header: expected 'Bearer <key>'")
        tenant = self.tenants.get(_digest(key.strip()))
        if tenant is None:
            raise KeyRefused(AuthFailure.UNKNOWN, "incorrect API key provided")
        return tenant


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
