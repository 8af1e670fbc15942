"""SignedStore: a store view whose values only the holder of a session key can have written."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from typing import Any, cast

import torch.distributed as dist

from scalellm.transfer.errors import AuthenticationError

TAG_BYTES = 32


class SignedStore(dist.Store):
    """A store view whose values carry ``H(S, key | value)``: the process group's rendezvous keys
    (gloo addresses, the NCCL id) cannot be replaced by someone without the session key."""

    def __init__(self, inner: dist.Store, key: bytes) -> None:
        super().__init__()
        self._inner, self._key = inner, key

    def _tag(self, name: str, value: bytes) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + value, hashlib.sha256).digest()

    def set(self, key: str, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        # torch's stubs type Store.set's value as str; the C++ store keeps bytes as they are.
        cast(Any, self._inner).set(key, self._tag(key, raw) + raw)

    def get(self, key: str) -> bytes:
        raw = self._inner.get(key)
        value = raw[TAG_BYTES:]
        if not hmac.compare_digest(raw[:TAG_BYTES], self._tag(key, value)):
            raise AuthenticationError(f"rendezvous key {key!r} was not written by the authenticated peer")
        return value

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self._inner.wait(keys)
        else:
            self._inner.wait(keys, timeout)

    def add(self, key: str, value: int) -> int:
        return self._inner.add(key, value)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check(keys)

    def delete_key(self, key: str) -> bool:
        return self._inner.delete_key(key)

    def num_keys(self) -> int:
        return self._inner.num_keys()
