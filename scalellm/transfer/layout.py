"""The KV-cache layout both ends of a pair must agree on before any KV flows."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Final

import torch

from scalellm.transfer.errors import ProtocolError, TransferError

PROTOCOL_VERSION: Final[int] = 3
"""Version of the wire protocol (frame format, control messages, store keys); 3 added the tags."""

_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,  # an int8 cache (engine/kv_quant.py): head_dim is then D + 2 (the scale)
}


@dataclass(frozen=True)
class FieldDiff:
    """One layout field whose value differs between the two ends."""

    name: str
    local: object
    peer: object


class LayoutMismatchError(TransferError):
    """The peer's KV layout is incompatible with ours; no KV may flow between them."""

    def __init__(self, diffs: tuple[FieldDiff, ...], peer: str = "peer") -> None:
        self.diffs = diffs
        self.peer = peer
        detail = "; ".join(f"{d.name}: local={d.local!r} {peer}={d.peer!r}" for d in diffs)
        if any(d.name == "num_kv_heads" for d in diffs):
            detail += f" ({_HEADS_HINT})"
        super().__init__(f"KV layout mismatch with {peer}: {detail}")


_HEADS_HINT = (
    "both ends carry all the model's K/V heads whatever their tensor-parallel sizes, which are "
    "re-sharded on each side: a different head count is another model, not another split"
)


@dataclass(frozen=True)
class KVLayout:
    """Shape-defining facts of a worker's paged KV cache (all but its number of blocks).

    ``num_kv_heads`` is the model's: a tensor-parallel worker (whose ranks hold a slice of the
    heads each) sends gathered blocks and lands pushed ones with every head, then scatters them,
    so any sending size pairs with any receiving size (engine gather_kv / scatter_kv).

    The cache tensor is block-major: ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
    head_dim]``, so that a run of consecutive blocks is one contiguous slice.
    """

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")

    @classmethod
    def from_kv_cache(cls, kv_cache: torch.Tensor, model: str) -> KVLayout:
        """The layout of an engine KV cache tensor serving ``model``."""
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2 or not kv_cache.is_contiguous():
            raise ValueError(
                "expected a contiguous [blocks, layers, 2, block_size, heads, dim] cache, got "
                f"{tuple(kv_cache.shape)}"
            )
        _, layers, _, block_size, heads, head_dim = kv_cache.shape
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        return cls(model, dtype, layers, heads, head_dim, block_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: K and V of ``block_size`` tokens in every layer."""
        item = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * item

    def diff(self, peer: KVLayout) -> tuple[FieldDiff, ...]:
        """Every field that differs, in declaration order."""
        return tuple(
            FieldDiff(f.name, getattr(self, f.name), getattr(peer, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(peer, f.name)
        )

    def check_compatible(self, peer: KVLayout, peer_name: str = "peer") -> None:
        """Raise :class:`LayoutMismatchError` naming every differing field."""
        diffs = self.diff(peer)
        if diffs:
            raise LayoutMismatchError(diffs, peer_name)

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``kv_cache`` has this layout."""
        got = KVLayout.from_kv_cache(kv_cache, self.model)
        diffs = self.diff(got)
        if diffs:
            raise ValueError(f"kv_cache does not match the layout: {LayoutMismatchError(diffs, 'cache')}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, peer_name: str = "peer") -> KVLayout:
        """Parse a peer's layout; a peer on another protocol version is a mismatch, not garbage."""
        try:
            fields = json.loads(text)
            version = fields.get("protocol_version")
        except (AttributeError, ValueError) as exc:
            raise ProtocolError(f"malformed KV layout from {peer_name}: {text!r}") from exc
        if version != PROTOCOL_VERSION:
            raise LayoutMismatchError((FieldDiff("protocol_version", PROTOCOL_VERSION, version),), peer_name)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed KV layout from {peer_name}: {text!r}") from exc
