"""The mesh token: one shared secret that internal gRPC calls carry and KV-transfer pairs prove.

A check hashes what was presented and compares SHA-256 digests with ``hmac.compare_digest``: about
a microsecond, and its time says nothing about how much of a guess was right (not even its
length). The token is never printed: ``repr`` only says that one is set. Keys for other uses (the
KV-transfer HMAC key) are derived from it with HMAC, one label per use, so no two uses share a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

METADATA_KEY: Final[str] = "x-scalellm-mesh-token"
"""The gRPC metadata key internal calls carry the token in (lower case, as HTTP/2 requires)."""
MIN_LENGTH: Final[int] = 16


class MeshToken:
    """A validated token: printable ASCII without whitespace (it travels as a gRPC header value),
    at least :data:`MIN_LENGTH` characters."""

    __slots__ = ("_digest", "_secret")

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_LENGTH:
            raise ValueError(f"the mesh token must have at least {MIN_LENGTH} characters")
        if not all(33 <= ord(c) <= 126 for c in secret):
            raise ValueError("the mesh token must be printable ASCII without spaces")
        self._secret = secret
        self._digest = _sha256(secret.encode())

    @classmethod
    def generate(cls) -> MeshToken:
        """A fresh random token (256 bits, URL-safe text)."""
        return cls(secrets.token_urlsafe(32))

    @property
    def value(self) -> str:
        """The token itself, for the metadata of a call or a child's environment. Never log it."""
        return self._secret

    def matches(self, presented: str | bytes | None) -> bool:
        """Whether ``presented`` is this token, in time independent of the guess."""
        if presented is None:
            return False
        raw = presented.encode("utf-8", "surrogateescape") if isinstance(presented, str) else presented
        return hmac.compare_digest(_sha256(raw), self._digest)

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one use (e.g. ``"kv-transfer"``), independent of every other label's."""
        return hmac.new(self._secret.encode(), f"scalellm/{label}".encode(), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "MeshToken(<redacted>)"


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
