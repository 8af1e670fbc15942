"""ServedModel: what the gateway knows of its model (tokenizer, name, context) and its token limits."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import decoders

from scalellm.text import Tokenizer
from services.gateway.config import GatewayConfig

# Used when config.json names no context length.
_DEFAULT_CONTEXT = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLimits:
    """Token bounds checked before any worker is touched."""

    max_prompt_tokens: int
    max_total_tokens: int

    @classmethod
    def resolve(cls, config: GatewayConfig, context_length: int) -> TokenLimits:
        """Configured limits, capped by the model's context length (0 means that length)."""
        total = min(config.max_total_tokens or context_length, context_length)
        prompt = min(config.max_prompt_tokens or total - 1, total - 1)
        if prompt < 1:
            raise ValueError(f"max_total_tokens {total} leaves no room for a prompt and one token")
        return cls(max_prompt_tokens=prompt, max_total_tokens=total)


class ServedModel:
    """The served model: its tokenizer, public name, context length and token limits."""

    def __init__(self, path: Path, config: GatewayConfig) -> None:
        self.path = path
        self.tokenizer = Tokenizer.from_dir(path)
        self.name = config.served_model_name or path.name
        self.context_length = _context_length(path)
        self.limits = TokenLimits.resolve(config, self.context_length)
        self.created = int(time.time())
        self.worker_model: str | None = (
            None if config.worker_model == "*" else config.worker_model or self.name
        )
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)
        self._token_bytes = lru_cache(maxsize=65536)(self._bytes_of)
        self._byte_level = isinstance(self.tokenizer.backend.decoder, decoders.ByteLevel)

    def accepts(self, name: str | None) -> bool:
        """True for the names a request may use: empty (the default), the served name or the folder."""
        return not name or name == self.name or name == str(self.path)

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (logprobs tables); cached, special tokens kept."""
        return self._token_text(token_id)

    def token_bytes(self, token_id: int) -> tuple[int, ...]:
        """The UTF-8 bytes one token stands for (exact for byte-level BPE, even mid-character)."""
        return self._token_bytes(token_id)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes_of(self, token_id: int) -> tuple[int, ...]:
        piece = self.tokenizer.id_to_token(token_id)
        if self._byte_level and piece is not None and token_id not in self.tokenizer.special_token_ids:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return tuple(table[ch] for ch in piece)
        return tuple(self._decode_one(token_id).encode("utf-8"))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _context_length(path: Path) -> int:
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _DEFAULT_CONTEXT
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = raw.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_CONTEXT
