"""API keys: a file of keys mapped to tenants, checked on every route but /health.

File format, one key per line: ``KEY TENANT`` (whitespace between; TENANT defaults to "default").
Blank lines and lines starting with ``#`` are skipped. Keys are kept only as SHA-256 digests, so a
lookup costs the same whichever key is presented and the process never holds the keys in clear.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from services.gateway.errors import ErrorKind, GatewayError

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest of each key -> its tenant. Empty means authentication is off."""

    tenants: dict[bytes, str]

    @classmethod
    def disabled(cls) -> ApiKeys:
        return cls({})

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a keys file; ValueError on a malformed one (a gateway must not start open by mistake)."""
        tenants: dict[bytes, str] = {}
        for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
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
        """The tenant of an ``Authorization: Bearer KEY`` value; GatewayError(UNAUTHENTICATED) if none."""
        if not self.tenants:
            return ANONYMOUS
        if not authorization:
            raise _unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
        tenant = self.tenants.get(_digest(key.strip()))
        if tenant is None:
            raise _unauthenticated("incorrect API key provided")
        return tenant


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _unauthenticated(message: str) -> GatewayError:
    return GatewayError(ErrorKind.UNAUTHENTICATED, message, code="invalid_api_key")
